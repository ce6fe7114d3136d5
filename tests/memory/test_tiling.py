"""Sequence-tiled MLP / RMSNorm / chunked cross entropy vs. untiled autograd references."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from torchtitan.components.loss import IGNORE_INDEX, cross_entropy_loss
from torchtitan.models.llama3.model.model import FeedForward

from torchtitan_upipe.memory import (
    TiledFeedForward,
    TiledRMSNorm,
    apply_tiled_mlp,
    apply_tiled_rms_norm,
    auto_num_tiles,
    chunked_cross_entropy,
    tiled_mlp,
    tiled_rms_norm,
)

TOL = dict(atol=1e-10, rtol=1e-10)
S = 7  # 3 tiles do not divide it
TILES = [1, 3, S, S + 4]
DIM, HIDDEN, VOCAB = 8, 24, 19


def _close(a, b, **kw):
    torch.testing.assert_close(a, b, **(kw or TOL))


def _leaf(*shape, dtype=torch.float64, scale=1.0, gen=None):
    return (torch.randn(*shape, dtype=dtype, generator=gen) * scale).requires_grad_()


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


# ---------------------------------------------------------------------------- tiled MLP


def _ref_mlp(x, w1, w2, w3):
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("num_tiles", TILES)
def test_tiled_mlp_matches_reference(batch, num_tiles):
    g = torch.Generator().manual_seed(batch * 100 + num_tiles)
    x = _leaf(batch, S, DIM, gen=g)
    w1, w3 = _leaf(HIDDEN, DIM, gen=g, scale=0.3), _leaf(HIDDEN, DIM, gen=g, scale=0.3)
    w2 = _leaf(DIM, HIDDEN, gen=g, scale=0.3)
    gy = torch.randn(batch, S, DIM, dtype=torch.float64, generator=g)
    inputs = (x, w1, w2, w3)

    ref = _ref_mlp(*inputs)
    out = tiled_mlp(*inputs, num_tiles)
    _close(out, ref)
    for got, want in zip(_grads(out, inputs, gy), _grads(ref, inputs, gy)):
        _close(got, want)


def test_tiled_mlp_partial_requires_grad():
    g = torch.Generator().manual_seed(1)
    x = _leaf(2, S, DIM, gen=g)
    ws = [torch.randn(HIDDEN, DIM, dtype=torch.float64, generator=g),
          torch.randn(DIM, HIDDEN, dtype=torch.float64, generator=g),
          torch.randn(HIDDEN, DIM, dtype=torch.float64, generator=g)]
    gy = torch.randn(2, S, DIM, dtype=torch.float64, generator=g)
    # frozen weights: only dx
    (dx,) = _grads(tiled_mlp(x, *ws, 3), (x,), gy)
    (dx_ref,) = _grads(_ref_mlp(x, *ws), (x,), gy)
    _close(dx, dx_ref)
    # input without grad, only w2 trainable
    w2 = ws[1].clone().requires_grad_()
    xd = x.detach()
    (dw2,) = _grads(tiled_mlp(xd, ws[0], w2, ws[2], 3), (w2,), gy)
    (dw2_ref,) = _grads(_ref_mlp(xd, ws[0], w2, ws[2]), (w2,), gy)
    _close(dw2, dw2_ref)


def test_auto_num_tiles():
    assert auto_num_tiles(1, 4096) == 1
    assert auto_num_tiles(0, 4096) == 1
    assert auto_num_tiles(4096, 4096) == 1
    assert auto_num_tiles(4097, 4096) == 2
    assert auto_num_tiles(1_000_000, 4096) == 245


def _feed_forward(seed=0):
    torch.manual_seed(seed)
    ff = FeedForward(dim=DIM, hidden_dim=4 * DIM, multiple_of=4, ffn_dim_multiplier=None)
    with torch.no_grad():
        ff.init_weights(0.2)
    return ff.double()


@pytest.mark.parametrize("num_tiles", [3, None])
def test_apply_tiled_mlp_module(num_tiles):
    ref = _feed_forward()
    tiled = apply_tiled_mlp(copy.deepcopy(ref), num_tiles)
    assert isinstance(tiled, FeedForward) and isinstance(tiled, TiledFeedForward)
    assert tiled.num_tiles == num_tiles
    assert list(tiled.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in tiled.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for k, v in ref.state_dict().items():
        assert torch.equal(tiled.state_dict()[k], v)

    x = _leaf(2, S, DIM, gen=torch.Generator().manual_seed(3))
    x2 = x.detach().clone().requires_grad_()
    gy = torch.randn(2, S, DIM, dtype=torch.float64)
    y_ref, y = ref(x), tiled(x2)
    _close(y, y_ref)
    y_ref.backward(gy)
    y.backward(gy)
    _close(x2.grad, x.grad)
    for (n, p), (_, q) in zip(ref.named_parameters(), tiled.named_parameters()):
        _close(q.grad, p.grad)

    # re-applying updates the tile count; a fresh TiledFeedForward has the same keys
    assert apply_tiled_mlp(tiled, 5).num_tiles == 5
    fresh = TiledFeedForward(DIM, 4 * DIM, 4, None, num_tiles=2)
    assert list(fresh.state_dict()) == list(ref.state_dict())
    fresh.load_state_dict(ref.state_dict())  # strict
    assert "num_tiles=2" in repr(fresh)


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
    _close(tiled(x), ref(x))

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


# ---------------------------------------------------------------------------- memory


class LiveBytes(TorchDispatchMode):
    """Peak of live tensor-storage bytes allocated by ops run under this mode."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key, nbytes):
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key, nbytes = st.data_ptr(), st.nbytes()
                if nbytes == 0 or key in self._seen:
                    continue
                self._seen.add(key)
                self.live += nbytes
                weakref.finalize(st, self._free, key, nbytes)
        self.peak = max(self.peak, self.live)
        return out


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


# ---------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("num_tiles", TILES)
@pytest.mark.parametrize("eps", [None, 1e-5])
def test_tiled_rms_norm_matches_reference(batch, num_tiles, eps):
    g = torch.Generator().manual_seed(batch * 10 + num_tiles)
    x = _leaf(batch, S, DIM, gen=g)
    w = (1 + 0.1 * torch.randn(DIM, dtype=torch.float64, generator=g)).requires_grad_()
    gy = torch.randn(batch, S, DIM, dtype=torch.float64, generator=g)

    ref = F.rms_norm(x, (DIM,), w, eps)
    out = tiled_rms_norm(x, w, eps, num_tiles)
    _close(out, ref)
    for got, want in zip(_grads(out, (x, w), gy), _grads(ref, (x, w), gy)):
        _close(got, want)

    # no affine weight
    ref = F.rms_norm(x, (DIM,), None, eps)
    out = tiled_rms_norm(x, None, eps, num_tiles)
    _close(out, ref)
    _close(_grads(out, (x,), gy)[0], _grads(ref, (x,), gy)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_rms_norm_low_precision(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 33, 64, generator=g).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(64, generator=g)).to(dtype).requires_grad_()
    gy = torch.randn(2, 33, 64, generator=g).to(dtype)
    ref = F.rms_norm(x, (64,), w, 1e-6)
    out = tiled_rms_norm(x, w, 1e-6, 5)
    assert out.dtype == dtype
    # identical op-math formula -> identical forward
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    dx, dw = _grads(out, (x, w), gy)
    dx_ref, dw_ref = _grads(ref, (x, w), gy)
    assert dx.dtype == dw.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(dx, dx_ref, **tol)
    torch.testing.assert_close(dw, dw_ref, **tol)


@pytest.mark.parametrize("num_tiles", [2, None])
def test_tiled_rms_norm_module(num_tiles):
    ref = nn.RMSNorm(DIM, eps=1e-6).double()
    with torch.no_grad():
        ref.weight.mul_(torch.linspace(0.5, 1.5, DIM, dtype=torch.float64))
    tiled = apply_tiled_rms_norm(copy.deepcopy(ref), num_tiles)
    assert isinstance(tiled, TiledRMSNorm) and isinstance(tiled, nn.RMSNorm)
    assert list(tiled.state_dict()) == list(ref.state_dict()) == ["weight"]
    fresh = TiledRMSNorm(DIM, eps=1e-6, num_tiles=3)
    assert list(fresh.state_dict()) == ["weight"]
    fresh.load_state_dict(ref.state_dict())

    x = _leaf(2, S, DIM, gen=torch.Generator().manual_seed(5))
    x2 = x.detach().clone().requires_grad_()
    gy = torch.randn(2, S, DIM, dtype=torch.float64)
    y_ref, y = ref(x), tiled(x2)
    _close(y, y_ref)
    y_ref.backward(gy)
    y.backward(gy)
    _close(x2.grad, x.grad)
    _close(tiled.weight.grad, ref.weight.grad)


# ---------------------------------------------------------------------------- chunked loss


def _ref_loss(h, w, labels):
    # TorchTitan's cross_entropy_loss on a bias-free output Linear, kept in h's dtype
    # (TorchTitan's .float() would downcast float64; tested separately in float32)
    logits = F.linear(h, w)
    return F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(0, 1), reduction="sum", ignore_index=IGNORE_INDEX
    )


def _labels(batch, s, gen):
    labels = torch.randint(0, VOCAB, (batch, s), generator=gen)
    labels[0, 0] = IGNORE_INDEX
    labels[-1, -1] = IGNORE_INDEX
    labels[:, 3:5] = IGNORE_INDEX  # with 3 chunks of S=7 (3, 2, 2) the 2nd is all-ignored
    return labels


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("num_chunks", TILES)
def test_chunked_cross_entropy_matches_reference(batch, num_chunks):
    g = torch.Generator().manual_seed(batch * 7 + num_chunks)
    h = _leaf(batch, S, DIM, gen=g)
    w = _leaf(VOCAB, DIM, gen=g, scale=0.5)
    labels = _labels(batch, S, g)
    assert torch.tensor_split(labels, 3, dim=1)[1].eq(IGNORE_INDEX).all()

    ref = _ref_loss(h, w, labels)
    out = chunked_cross_entropy(h, w, labels, num_chunks)
    assert out.dtype == torch.float64 and out.dim() == 0
    _close(out, ref)
    scale = torch.tensor(0.37, dtype=torch.float64)  # non-unit upstream grad
    for got, want in zip(_grads(out, (h, w), scale), _grads(ref, (h, w), scale)):
        _close(got, want)


def test_chunked_cross_entropy_all_ignored():
    h = _leaf(2, S, DIM)
    w = _leaf(VOCAB, DIM)
    labels = torch.full((2, S), IGNORE_INDEX)
    out = chunked_cross_entropy(h, w, labels, 3)
    _close(out, _ref_loss(h, w, labels))
    assert out.item() == 0.0
    dh, dw = _grads(out, (h, w), torch.tensor(1.0, dtype=torch.float64))
    assert not dh.any() and not dw.any()


def test_chunked_cross_entropy_custom_ignore_index():
    g = torch.Generator().manual_seed(11)
    h, w = _leaf(2, S, DIM, gen=g), _leaf(VOCAB, DIM, gen=g)
    labels = torch.randint(0, VOCAB, (2, S), generator=g)
    labels[:, 1] = 3
    ref = F.cross_entropy(F.linear(h, w).flatten(0, 1), labels.flatten(), reduction="sum",
                          ignore_index=3)
    out = chunked_cross_entropy(h, w, labels, 3, ignore_index=3)
    _close(out, ref)
    for got, want in zip(_grads(out, (h, w), None), _grads(ref, (h, w), None)):
        _close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_vs_torchtitan(dtype):
    """Low-precision semantics: model-dtype logits, float32 loss, as cross_entropy_loss."""
    g = torch.Generator().manual_seed(2)
    output = nn.Linear(32, 50, bias=False).to(dtype)
    h = torch.randn(2, 20, 32, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (2, 20), generator=g)
    labels[:, 5:9] = IGNORE_INDEX

    ref = cross_entropy_loss(output(h), labels)
    dh_ref, dw_ref = _grads(ref, (h, output.weight), None)
    out = chunked_cross_entropy(h, output.weight, labels, 3)
    assert out.dtype == ref.dtype == torch.float32
    dh, dw = _grads(out, (h, output.weight), None)
    assert dh.dtype == dw.dtype == dtype
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(dh, dh_ref, **tol)
    torch.testing.assert_close(dw, dw_ref, **tol)


def test_chunked_cross_entropy_memory():
    """The (S, vocab) logits never exist: the peak stays below one full float32 logits."""
    s, dim, vocab = 256, 16, 512
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, s, dim, generator=g)
    w = torch.randn(vocab, dim, generator=g)
    labels = torch.randint(0, vocab, (1, s), generator=g)
    full_logits = s * vocab * 4

    def peak(fn):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with LiveBytes() as mode:
            fn(hh, ww).backward()
        assert hh.grad is not None and ww.grad is not None
        return mode.peak

    untiled = peak(lambda hh, ww: cross_entropy_loss(F.linear(hh, ww), labels))
    chunked = peak(lambda hh, ww: chunked_cross_entropy(hh, ww, labels, 16))
    assert untiled > 2 * full_logits
    assert chunked < 0.5 * full_logits, (chunked, full_logits)
