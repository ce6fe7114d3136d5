"""Every CUDA attention kernel against the math kernel, forward (out, LSE) and backward (dq,
dk, dv), in bf16 and fp16, with and without GQA and the causal mask, at odd lengths and with
the strides UPipe hands them: a query stage sliced out of a wider head dimension, K and V
unpacked from the fused K|V all-to-all buffer, an incoming gradient sliced like the query.

The math kernel computes from the same low-precision inputs in float32 and rounds its
results once, so the differences are the kernels' own.  Tolerances: TransformerEngine's
(:mod:`tests.helpers.cuda`).  On a machine without CUDA every test here is skipped.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.helpers.cuda import CUDA, assert_te_close, te_tolerance
from torchtitan_upipe.cp.comm import pack_pair, unpack_pair
from torchtitan_upipe.cp.kernels import get_kernel

pytestmark = CUDA

KERNELS = [
    "sdpa",
    "cudnn",
    pytest.param("flash_attn", marks=pytest.mark.skipif(
        importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")),
]
DTYPES = [torch.bfloat16, torch.float16]
HEADS = [(8, 8), (8, 2)]  # (query heads of this call, KV heads)
# (S_q, S_k, causal): causal calls have equal lengths (the contract on CUDA); a ring step
# attends a query block to a longer, unmasked key block
SHAPES = [(128, 128, True), (257, 257, True), (257, 257, False), (130, 257, False)]


def _inputs(s_q, s_k, h, h_kv, d, dtype, seed):
    """q, k, v, dout with UPipe's layouts: non-contiguous views of wider buffers."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=dtype, generator=g)

    q = randn(2, s_q, 2 * h, d)[:, :, h:]                      # one stage's heads
    k, v = unpack_pair(pack_pair(randn(2, s_k, h_kv, d), randn(2, s_k, h_kv, d)))
    dout = randn(2, s_q, 3 * h, d)[:, :, h:2 * h]
    assert not (q.is_contiguous() or k.is_contiguous() or dout.is_contiguous())
    return q, k, v, dout


@pytest.mark.parametrize("s_q,s_k,causal", SHAPES)
@pytest.mark.parametrize("h,h_kv", HEADS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("name", KERNELS)
def test_kernel_matches_math(name, head_dim, dtype, h, h_kv, s_q, s_k, causal):
    q, k, v, dout = _inputs(s_q, s_k, h, h_kv, head_dim, dtype, seed=s_q + h_kv + head_dim)
    kernel, math = get_kernel(name, "cuda"), get_kernel("math", "cuda")
    scale = head_dim**-0.5
    out, lse = kernel.forward(q, k, v, causal=causal, scale=scale)
    ref_out, ref_lse = math.forward(q, k, v, causal=causal, scale=scale)
    grads = kernel.backward(dout, q, k, v, out, lse, causal=causal, scale=scale)
    ref_grads = math.backward(dout, q, k, v, ref_out, ref_lse, causal=causal, scale=scale)

    tol = te_tolerance(dtype, gqa=h != h_kv)
    case = f"{name} D={head_dim} {dtype} H={h} H_kv={h_kv} S_q={s_q} S_k={s_k} causal={causal}"
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (2, h, s_q) and lse.dtype == torch.float32
    assert_te_close(out, ref_out, tol, f"{case} out")
    # the LSE is float32 from the same products in both: much closer than the outputs
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=2e-3, msg=lambda m: f"{case} lse: {m}")
    for what, got, ref, like in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
        assert got.shape == like.shape and got.dtype == dtype, (what, got.shape, got.dtype)
        assert_te_close(got, ref, tol, f"{case} {what}")


@pytest.mark.parametrize("name", ["sdpa", "cudnn"])
def test_causal_calls_with_unequal_lengths_are_refused(name):
    """CUDA kernels align a causal mask bottom-right; the contract is top-left."""
    q, k, v, _ = _inputs(130, 257, 8, 8, 64, torch.bfloat16, seed=0)
    with pytest.raises(ValueError, match="equal query and key lengths"):
        get_kernel(name, "cuda").forward(q, k, v, causal=True, scale=0.125)


def test_auto_is_cudnn_on_hopper():
    name = type(get_kernel("auto", "cuda")).__name__
    if torch.cuda.get_device_capability() == (9, 0) and torch.backends.cudnn.is_available():
        assert name == "CudnnKernel"
    else:
        assert name in ("FlashAttnKernel", "SdpaKernel")
