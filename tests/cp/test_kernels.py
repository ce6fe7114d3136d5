"""Attention kernels against a plain autograd reference (CPU): out, lse, dq/dk/dv, GQA, registry."""

from __future__ import annotations

import itertools
import sys

import pytest
import torch

from torchtitan_upipe.cp.kernels import (
    KERNEL_CHOICES,
    CudnnKernel,
    FlashAttnKernel,
    MathKernel,
    SdpaKernel,
    get_kernel,
    kernel_attention,
)

F64_TOL = dict(atol=1e-10, rtol=1e-10)
F32_TOL = dict(atol=1e-5, rtol=1e-5)

SHAPES = list(
    itertools.product(
        (1, 2),  # B
        (1, 7, 16),  # S
        ((4, 4), (8, 2), (6, 3)),  # (H, H_kv)
        (8, 16),  # D
    )
)
KERNELS = {"math": MathKernel, "sdpa": SdpaKernel}


def reference(q, k, v, *, causal, scale):
    """softmax(q k^T * scale + causal mask) v with kv heads repeated; lse of the masked scores."""
    g = q.shape[2] // k.shape[2]
    qq = q.transpose(1, 2)
    kk = k.repeat_interleave(g, dim=2).transpose(1, 2)
    vv = v.repeat_interleave(g, dim=2).transpose(1, 2)
    scores = qq @ kk.transpose(-1, -2) * scale
    if causal:
        mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, S_q)
    out = (scores.softmax(-1) @ vv).transpose(1, 2)
    return out, lse


def reference_grads(q, k, v, dout, *, causal, scale):
    """(out, lse, dq, dk, dv) of the reference, computed in float64 by autograd."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse = reference(q, k, v, causal=causal, scale=scale)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout.double())
    return out.detach(), lse.detach(), dq, dk, dv


def make_inputs(b, s, h, h_kv, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, h, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, s, h_kv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, s, h_kv, d, generator=gen, dtype=torch.float64)
    dout = torch.randn(b, s, h, d, generator=gen, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (q, k, v, dout))


def check_kernel(kernel, q, k, v, dout, *, causal, scale, tol):
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = reference_grads(
        q, k, v, dout, causal=causal, scale=scale
    )
    out, lse = kernel.forward(q, k, v, causal=causal, scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    assert lse.dtype == lse_dtype
    torch.testing.assert_close(out.double(), ref_out, **tol)
    torch.testing.assert_close(lse.double(), ref_lse, **tol)

    dq, dk, dv = kernel.backward(dout, q, k, v, out, lse, causal=causal, scale=scale)
    for got, want, like in ((dq, ref_dq, q), (dk, ref_dk, k), (dv, ref_dv, v)):
        assert got.shape == like.shape and got.dtype == like.dtype
        torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("b,s,heads,d", SHAPES)
@pytest.mark.parametrize("name", ["math", "sdpa"])
def test_kernel_float64(name, b, s, heads, d, causal):
    h, h_kv = heads
    q, k, v, dout = make_inputs(b, s, h, h_kv, d, torch.float64)
    check_kernel(KERNELS[name](), q, k, v, dout, causal=causal, scale=d**-0.5, tol=F64_TOL)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("b,s,heads,d", SHAPES)
def test_sdpa_float32(b, s, heads, d, causal):
    h, h_kv = heads
    q, k, v, dout = make_inputs(b, s, h, h_kv, d, torch.float32)
    check_kernel(SdpaKernel(), q, k, v, dout, causal=causal, scale=d**-0.5, tol=F32_TOL)


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_bfloat16_lse_is_float32(causal):
    q, k, v, dout = make_inputs(2, 16, 8, 2, 16, torch.bfloat16)
    out, lse = SdpaKernel().forward(q, k, v, causal=causal, scale=0.25)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    ref_out, ref_lse = reference(q.double(), k.double(), v.double(), causal=causal, scale=0.25)
    # scores are accumulated in float32 (bf16 eps is 8e-3): lse is float32-accurate
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-2, rtol=2e-2)
    dq, dk, dv = SdpaKernel().backward(dout, q, k, v, out, lse, causal=causal, scale=0.25)
    assert (dq.dtype, dk.dtype, dv.dtype) == (torch.bfloat16,) * 3
    assert dk.shape == k.shape and dv.shape == v.shape


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("s_q,s_k,h,h_kv", [(5, 9, 4, 1), (9, 5, 4, 2)])
def test_sdpa_unequal_lengths_top_left_causal(s_q, s_k, h, h_kv, causal):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, s_q, h, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, s_k, h_kv, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, s_k, h_kv, 8, generator=gen, dtype=torch.float64)
    dout = torch.randn(2, s_q, h, 8, generator=gen, dtype=torch.float64)
    check_kernel(SdpaKernel(), q, k, v, dout, causal=causal, scale=0.3, tol=F64_TOL)


def test_sdpa_non_contiguous_inputs():
    # q/k/v sliced out of a packed projection, dout and a BHSD-contiguous q: strided views
    gen = torch.Generator().manual_seed(2)
    b, s, h, h_kv, d = 2, 7, 8, 2, 8
    qkv = torch.randn(b, s, (h + 2 * h_kv) * d, generator=gen, dtype=torch.float64)
    q, k, v = qkv.view(b, s, h + 2 * h_kv, d).split([h, h_kv, h_kv], dim=2)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # BHSD memory, BSHD shape
    dout = torch.randn(b, d, s, h, generator=gen, dtype=torch.float64).permute(0, 2, 3, 1)
    assert dout.stride(-1) != 1 and not q.is_contiguous() and not k.is_contiguous()
    check_kernel(SdpaKernel(), q, k, v, dout, causal=True, scale=0.3, tol=F64_TOL)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", ["math", "sdpa"])
def test_kernel_attention_gradcheck(name, causal):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 3, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 3, 1, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 3, 1, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    kernel = KERNELS[name]()
    assert torch.autograd.gradcheck(
        lambda q, k, v: kernel_attention(q, k, v, kernel=kernel, causal=causal), (q, k, v)
    )


@pytest.mark.parametrize("name", ["math", "sdpa"])
def test_kernel_attention_matches_reference(name):
    # default scale D**-0.5, kernel given by name, and an expanded (stride-0) upstream grad
    q, k, v, _ = make_inputs(2, 7, 6, 3, 8, torch.float64, seed=4)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = kernel_attention(q, k, v, kernel=name)
    out.sum().backward()
    grads = [t.grad for t in (q, k, v)]
    ref_out, _, *ref_grads = reference_grads(
        q, k, v, torch.ones_like(out), causal=True, scale=8**-0.5
    )
    torch.testing.assert_close(out.detach(), ref_out, **F64_TOL)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **F64_TOL)


def test_get_kernel_unknown_name():
    with pytest.raises(ValueError, match=r"context_parallel\.kernel") as err:
        get_kernel("nope", "cpu")
    for choice in KERNEL_CHOICES:
        assert repr(choice) in str(err.value)


@pytest.mark.parametrize("name", ["cudnn", "flash_attn"])
def test_get_kernel_cuda_only_on_cpu(name):
    with pytest.raises(ValueError, match=rf"context_parallel\.kernel='{name}'"):
        get_kernel(name, "cpu")


def test_get_kernel_auto_and_named_on_cpu():
    assert type(get_kernel("auto", "cpu")) is SdpaKernel
    assert type(get_kernel("sdpa", torch.device("cpu"))) is SdpaKernel
    assert type(get_kernel("math", "cpu")) is MathKernel


def test_flash_attn_reason_without_package():
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        assert FlashAttnKernel().unavailable_reason(torch.device("cuda")) == (
            "flash-attn is not installed"
        )
    else:
        pytest.skip("flash-attn is installed here")


def _stub_flash_attn_interface():
    """A CPU stand-in with flash-attn 2.8.3's ``_flash_attn_forward/_backward`` signatures
    (math underneath, head_dim % 8 enforced as the CUDA extension does)."""
    math = MathKernel()

    def _flash_attn_forward(
        q, k, v, dropout_p, softmax_scale, causal, window_size_left, window_size_right,
        softcap, alibi_slopes, return_softmax,
    ):
        assert q.shape[-1] % 8 == 0 and dropout_p == 0.0 and not return_softmax
        assert (window_size_left, window_size_right, softcap) == (-1, -1, 0.0)
        out, lse = math.forward(q, k, v, causal=causal, scale=softmax_scale)
        return out, lse.float(), torch.empty(0), torch.zeros(2, dtype=torch.int64)

    def _flash_attn_backward(
        dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
        window_size_left, window_size_right, softcap, alibi_slopes, deterministic,
        rng_state=None,
    ):
        assert q.shape[-1] % 8 == 0 and dout.shape[-1] == q.shape[-1]
        grads = math.backward(
            dout, q, k, v, out, softmax_lse.double(), causal=causal, scale=softmax_scale
        )
        for buf, g in zip((dq, dk, dv), grads):
            buf.copy_(g)
        return torch.empty(0)

    iface = type(torch)("flash_attn.flash_attn_interface")
    iface._flash_attn_forward = _flash_attn_forward
    iface._flash_attn_backward = _flash_attn_backward
    pkg = type(torch)("flash_attn")
    pkg.flash_attn_interface = iface
    return pkg, iface


@pytest.mark.parametrize("d", [6, 8])
def test_flash_attn_plumbing_with_stub(monkeypatch, d):
    pkg, iface = _stub_flash_attn_interface()
    monkeypatch.setitem(sys.modules, "flash_attn", pkg)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", iface)
    kernel = FlashAttnKernel()
    assert kernel.unavailable_reason(torch.device("cuda")) is None
    assert "CUDA" in kernel.unavailable_reason(torch.device("cpu"))
    q, k, v, dout = make_inputs(2, 7, 8, 2, d, torch.float64)
    ref_out, ref_lse, *ref_grads = reference_grads(q, k, v, dout, causal=True, scale=0.3)
    out, lse = kernel.forward(q, k, v, causal=True, scale=0.3)
    torch.testing.assert_close(out, ref_out, **F64_TOL)
    torch.testing.assert_close(lse, ref_lse.float())
    grads = kernel.backward(dout, q, k, v, out, lse, causal=True, scale=0.3)
    for got, want, like in zip(grads, ref_grads, (q, k, v)):
        assert got.shape == like.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # lse went via float32


def test_cuda_op_plumbing_on_meta():
    """Argument order/arity of the CUDA aten calls, checked against torch's meta kernels."""
    q = torch.empty(2, 16, 8, 64, dtype=torch.bfloat16, device="meta")
    k = torch.empty(2, 16, 2, 64, dtype=torch.bfloat16, device="meta")
    sdpa = SdpaKernel()
    out, lse = sdpa._forward_cuda(q, k, k, causal=True, scale=0.125)
    assert out.shape == q.shape and lse.shape == (2, 8, 16) and lse.dtype == torch.float32
    dq, dk, dv = sdpa._backward_cuda(out, q, k, k, out, lse, causal=True, scale=0.125)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, k.shape)
    with pytest.raises(ValueError, match="float16/bfloat16"):
        sdpa._forward_cuda(q.float(), k.float(), k.float(), causal=True, scale=0.125)

    cudnn = CudnnKernel()
    out, lse = cudnn.forward(q, k, k, causal=True, scale=0.125)
    assert out.shape == q.shape and lse.shape == (2, 8, 16) and lse.dtype == torch.float32
    dq, dk, dv = cudnn.backward(out, q, k, k, out, lse, causal=True, scale=0.125)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, k.shape)


def test_auto_picks_the_fastest_exact_kernel_of_the_device():
    from torchtitan_upipe.cp.kernels import auto_kernel_name

    every = ("cudnn", "flash_attn", "sdpa")
    assert auto_kernel_name("cpu") == "sdpa"
    assert auto_kernel_name("cuda", (9, 0), every) == "cudnn"  # Hopper: cuDNN attention first
    assert auto_kernel_name("cuda", (9, 0), ("flash_attn", "sdpa")) == "flash_attn"
    assert auto_kernel_name("cuda", (9, 0), ("sdpa",)) == "sdpa"
    assert auto_kernel_name("cuda", (8, 0), every) == "flash_attn"  # Ampere: as before
    assert auto_kernel_name("cuda", (8, 0), ("cudnn", "sdpa")) == "sdpa"
    assert auto_kernel_name("cuda", None, ("sdpa",)) == "sdpa"  # unknown device


def test_a_failed_flash_attn_import_is_tried_once():
    """kernel='auto' asks at every layer of every step: the failure is cached, not retried."""
    from torchtitan_upipe.cp.kernels.flash_attn import flash_attn_interface

    if "flash_attn" in sys.modules:
        pytest.skip("flash-attn is importable here")
    errors = []
    for _ in range(2):
        with pytest.raises(ImportError) as caught:
            flash_attn_interface()
        errors.append(caught.value)
    assert errors[0] is errors[1]


def test_cuda_calls_refuse_fa2_offset_overflow_and_misaligned_causal_masks():
    """On meta tensors (no memory): the CUDA entry points refuse what FA2 would get wrong."""
    from torchtitan_upipe.cp.kernels.base import FA2_OFFSET_LIMIT, fa2_backward_offset

    assert fa2_backward_offset(4 * 2**20, 4, 128) == FA2_OFFSET_LIMIT  # Ulysses 8B over 8 at 4M
    assert fa2_backward_offset(4 * 2**20 - 200, 4, 128) < FA2_OFFSET_LIMIT
    assert fa2_backward_offset(100, 1, 72) == 128 * 96  # rows to 128, head dim to 32
    sdpa = SdpaKernel()
    q = torch.empty(1, 4 * 2**20, 4, 128, dtype=torch.bfloat16, device="meta")
    k = torch.empty(1, 4 * 2**20, 1, 128, dtype=torch.bfloat16, device="meta")
    with pytest.raises(ValueError, match=r"2\^31"):
        sdpa._backward_cuda(q, q, k, k, q, torch.empty(1, 4, 4 * 2**20, device="meta"),
                            causal=True, scale=0.1)
    small = q[:, :256]
    with pytest.raises(ValueError, match="equal query and key lengths"):
        sdpa._forward_cuda(small, k[:, :512], k[:, :512], causal=True, scale=0.1)
    sdpa._forward_cuda(small, k[:, :512], k[:, :512], causal=False, scale=0.1)  # a ring step
    with pytest.raises(ValueError, match="equal query and key lengths"):
        CudnnKernel().forward(small, k[:, :512], k[:, :512], causal=True, scale=0.1)
