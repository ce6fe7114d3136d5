"""Tiled SwiGLU MLP: exact against the untiled MLP (float64, forward and backward), module
swaps, bf16/autocast, and the memory it saves."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchtitan.models.llama3.model.model import FeedForward

from tests.helpers.numerics import DIM, HIDDEN, S, TILES, LiveBytes, close, grads, leaf
from torchtitan_upipe.memory import apply_tiled_mlp, auto_num_tiles, tiled_mlp



def _ref_mlp(x, w1, w2, w3):
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("num_tiles", TILES)
def test_tiled_mlp_matches_reference(batch, num_tiles):
    g = torch.Generator().manual_seed(batch * 100 + num_tiles)
    x = leaf(batch, S, DIM, gen=g)
    w1, w3 = leaf(HIDDEN, DIM, gen=g, scale=0.3), leaf(HIDDEN, DIM, gen=g, scale=0.3)
    w2 = leaf(DIM, HIDDEN, gen=g, scale=0.3)
    gy = torch.randn(batch, S, DIM, dtype=torch.float64, generator=g)
    inputs = (x, w1, w2, w3)

    ref = _ref_mlp(*inputs)
    out = tiled_mlp(*inputs, num_tiles)
    close(out, ref)
    for got, want in zip(grads(out, inputs, gy), grads(ref, inputs, gy)):
        close(got, want)


def test_tiled_mlp_partial_requires_grad():
    g = torch.Generator().manual_seed(1)
    x = leaf(2, S, DIM, gen=g)
    ws = [torch.randn(HIDDEN, DIM, dtype=torch.float64, generator=g),
          torch.randn(DIM, HIDDEN, dtype=torch.float64, generator=g),
          torch.randn(HIDDEN, DIM, dtype=torch.float64, generator=g)]
    gy = torch.randn(2, S, DIM, dtype=torch.float64, generator=g)
    # frozen weights: only dx
    (dx,) = grads(tiled_mlp(x, *ws, 3), (x,), gy)
    (dx_ref,) = grads(_ref_mlp(x, *ws), (x,), gy)
    close(dx, dx_ref)
    # input without grad, only w2 trainable
    w2 = ws[1].clone().requires_grad_()
    xd = x.detach()
    (dw2,) = grads(tiled_mlp(xd, ws[0], w2, ws[2], 3), (w2,), gy)
    (dw2_ref,) = grads(_ref_mlp(xd, ws[0], w2, ws[2]), (w2,), gy)
    close(dw2, dw2_ref)


def test_auto_num_tiles():
    assert auto_num_tiles(1, 4096) == 1
    assert auto_num_tiles(0, 4096) == 1
    assert auto_num_tiles(4096, 4096) == 1
    assert auto_num_tiles(4097, 4096) == 2
    assert auto_num_tiles(1_000_000, 4096) == 245


def test_apply_tiled_mlp_generic_module_and_checks():
    class MyMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Linear(DIM, HIDDEN, bias=False)
            self.w2 = nn.Linear(HIDDEN, DIM, bias=False)
            self.w3 = nn.Linear(DIM, HIDDEN, bias=False)

        def forward(self, x):
            return self.w2(F.silu(self.w1(x)) * self.w3(x))

    ref = MyMLP().double()
    tiled = apply_tiled_mlp(copy.deepcopy(ref), 2)
    assert isinstance(tiled, MyMLP) and type(tiled) is not MyMLP
    assert list(tiled.state_dict()) == list(ref.state_dict())
    x = torch.randn(1, S, DIM, dtype=torch.float64)
    close(tiled(x), ref(x))

    bad = MyMLP()
    bad.w1 = nn.Linear(DIM, HIDDEN, bias=True)
    with pytest.raises(ValueError):
        apply_tiled_mlp(bad, 2)
    with pytest.raises(ValueError):
        tiled_mlp(x, ref.w1.weight, ref.w2.weight, ref.w3.weight, 0)


def test_tiled_mlp_bf16_and_autocast():
    torch.manual_seed(0)
    ff = FeedForward(dim=32, hidden_dim=128, multiple_of=16, ffn_dim_multiplier=None)
    with torch.no_grad():
        ff.init_weights(0.1)
    ref64 = copy.deepcopy(ff).double()
    bf = copy.deepcopy(ff).to(torch.bfloat16)
    tiled = apply_tiled_mlp(copy.deepcopy(bf), 4)
    x = torch.randn(2, 24, 32)
    gy = torch.randn(2, 24, 32)

    x64 = x.double().requires_grad_()
    ref64(x64).backward(gy.double())
    xb_ref = x.to(torch.bfloat16).requires_grad_()
    bf(xb_ref).backward(gy.to(torch.bfloat16))
    xb = x.to(torch.bfloat16).requires_grad_()
    y = tiled(xb)
    assert y.dtype == torch.bfloat16
    y.backward(gy.to(torch.bfloat16))
    for p in tiled.parameters():
        assert p.grad.dtype == torch.bfloat16
    # the tiled bf16 grads are at least as close to the float64 truth as untiled bf16's
    for (n, p64), (_, pb), (_, pt) in zip(
        ref64.named_parameters(), bf.named_parameters(), tiled.named_parameters()
    ):
        err_ref = (pb.grad.double() - p64.grad).abs().max()
        err_tiled = (pt.grad.double() - p64.grad).abs().max()
        assert err_tiled <= 1.5 * err_ref + 1e-6, (n, err_tiled, err_ref)
    torch.testing.assert_close(xb.grad, xb_ref.grad, atol=2e-2, rtol=2e-2)

    # autocast: same dtype/values as the untiled module under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = ff(x)
        y_t = apply_tiled_mlp(copy.deepcopy(ff), 3)(x)
    assert y_t.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y_t, y_ref, atol=2e-2, rtol=2e-2)


def _peak_bytes(fn, x, ws, gy):
    x = x.detach().clone().requires_grad_()
    ws = [w.detach().clone().requires_grad_() for w in ws]
    with LiveBytes() as mode:
        y = fn(x, *ws)
        y.backward(gy)
        del y
    assert x.grad is not None and all(w.grad is not None for w in ws)
    return mode.peak


def test_tiled_mlp_memory():
    s, dim, hidden = 512, 16, 128
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, s, dim, generator=g)
    ws = [torch.randn(hidden, dim, generator=g), torch.randn(dim, hidden, generator=g),
          torch.randn(hidden, dim, generator=g)]
    gy = torch.randn(1, s, dim, generator=g)
    hidden_tensor = s * hidden * 4  # one full (S, hidden) float32 activation

    untiled = _peak_bytes(_ref_mlp, x, ws, gy)
    tiled = _peak_bytes(lambda *a: tiled_mlp(*a, 32), x, ws, gy)
    one_tile = _peak_bytes(lambda *a: tiled_mlp(*a, 1), x, ws, gy)
    # untiled autograd keeps several (S, hidden) activations alive at once
    assert untiled > 3 * hidden_tensor
    assert tiled < 0.5 * untiled, (tiled, untiled)
    # with 32 tiles, (S, hidden) intermediates are gone: the peak is x/out/dx-sized
    # tensors, the weight-grad accumulators and a few (S/32, hidden) tiles
    assert tiled < hidden_tensor, (tiled, hidden_tensor)
    assert tiled < 0.5 * one_tile


def test_weight_gradient_gemms_keep_bf16_operands_on_cuda():
    """On CUDA (checked on meta tensors: same dispatch, no memory) the weight-gradient GEMMs
    take bf16 operands and accumulate in float32 (no float32 copies of the operands, which ran
    at a fifteenth of the bf16 rate); on CPU they upcast one tile (exact float32 products)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from torchtitan_upipe.memory._common import add_mm_

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    for device, upcast in (("meta", False), ("cpu", True)):
        acc = torch.zeros(16, 8, device=device)
        a = torch.ones(16, 32, dtype=torch.bfloat16, device=device)
        b = torch.ones(32, 8, dtype=torch.bfloat16, device=device)
        with Ops() as mode:
            out = add_mm_(acc, a, b)
        assert out is acc and acc.dtype == torch.float32
        copies = [op for op in mode.ops if "_to_copy" in op]
        assert bool(copies) == upcast, (device, mode.ops)
        if device == "cpu":
            assert torch.equal(acc, torch.full((16, 8), 32.0))
