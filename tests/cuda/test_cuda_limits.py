"""The limits a long-context run meets on a GPU: FlashAttention-2's 32-bit dQ-accumulator
offset and the benchmark's device-memory cap.  Skipped without CUDA.

The FA2 guard is checked at the shape that crosses 2^31: one query block of 128 tokens
fewer runs (and is exact, last rows included, where an overflow would land), the next is
refused before any kernel starts, and cuDNN, which the refusal recommends, computes it.
The keys are short and unmasked (a ring step), so the 2M-token queries cost memory, not time.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from benchmarks.runner import classify_failure
from tests.helpers.cuda import CUDA, assert_te_close, te_tolerance
from tests.helpers.paths import ROOT
from torchtitan_upipe.cp.kernels import get_kernel
from torchtitan_upipe.cp.kernels.base import FA2_OFFSET_LIMIT, fa2_backward_offset

pytestmark = CUDA

H, D, S_K = 8, 128, 128
S_LIMIT = FA2_OFFSET_LIMIT // (H * D)  # 2^21 query tokens: the first length refused


def _tensors(s_q):
    g = torch.Generator(device="cuda").manual_seed(s_q)
    q, dout = (torch.randn(1, s_q, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(2))
    k, v = (torch.randn(1, S_K, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
            for _ in range(2))
    return q, k, v, dout


def _math_by_rows(q, k, v, dout, rows: int = 2**18):
    """The math kernel over blocks of query rows (unmasked: rows are independent, dK/dV sum)."""
    math = get_kernel("math", "cuda")
    outs, lses, dqs = [], [], []
    dk = torch.zeros(k.shape, device="cuda")
    dv = torch.zeros(v.shape, device="cuda")
    for i in range(0, q.shape[1], rows):
        qi, di = q[:, i:i + rows], dout[:, i:i + rows]
        o, lse = math.forward(qi, k, v, causal=False, scale=D**-0.5)
        dq, dki, dvi = math.backward(di, qi, k, v, o, lse, causal=False, scale=D**-0.5)
        outs.append(o), lses.append(lse), dqs.append(dq)
        dk += dki.float()
        dv += dvi.float()
    return torch.cat(outs, 1), torch.cat(lses, 2), torch.cat(dqs, 1), dk, dv


def _check_against_math(name, s_q):
    q, k, v, dout = _tensors(s_q)
    kernel = get_kernel(name, "cuda")
    out, lse = kernel.forward(q, k, v, causal=False, scale=D**-0.5)
    dq, dk, dv = kernel.backward(dout, q, k, v, out, lse, causal=False, scale=D**-0.5)
    ref = _math_by_rows(q, k, v, dout)
    tol = te_tolerance(torch.bfloat16, gqa=False)
    for what, got, want in zip(("out", "lse", "dq"), (out, lse, dq), ref[:3]):
        assert torch.isfinite(got).all(), f"{name} {what} at S_q={s_q}: not finite"
        assert_te_close(got, want, tol, f"{name} {what} at S_q={s_q}")
    # dK/dV sum 2M rows: compare relative to their magnitude
    for what, got, want in zip(("dk", "dv"), (dk, dv), ref[3:]):
        err = (got.float() - want).norm() / want.norm()
        assert err < 1e-2, f"{name} {what} at S_q={s_q}: relative error {err:.2e}"


def test_fa2_backward_just_below_the_offset_limit_runs_exactly():
    s_q = S_LIMIT - 128
    assert fa2_backward_offset(s_q, H, D) == FA2_OFFSET_LIMIT - 128 * H * D
    _check_against_math("sdpa", s_q)


def test_fa2_backward_at_the_offset_limit_is_refused_before_any_kernel():
    q, k, v, dout = _tensors(S_LIMIT)
    kernel = get_kernel("sdpa", "cuda")
    out, lse = kernel.forward(q, k, v, causal=False, scale=D**-0.5)  # the forward is unaffected
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match=r"past 2\^31.*kernel='cudnn'"):
        kernel.backward(dout, q, k, v, out, lse, causal=False, scale=D**-0.5)
    torch.cuda.synchronize()  # no illegal memory access was left pending


def test_cudnn_computes_what_fa2_refuses():
    _check_against_math("cudnn", S_LIMIT)


_CAP_PROBE = """
import torch
from torchtitan_upipe.titan.trainer import cap_device_memory
total = torch.cuda.get_device_properties(0).total_memory
fraction = cap_device_memory(80)
print("fraction", fraction, "total", total)
if fraction is None:  # an 80 GB (or smaller) device: the cap is the device itself
    assert total <= 80 * 2**30
    raise SystemExit(0)
assert abs(fraction * total - 80 * 2**30) < 2**20
kept = torch.empty(78 * 2**30, dtype=torch.uint8, device="cuda")  # fits under 80 GiB
torch.empty(3 * 2**30, dtype=torch.uint8, device="cuda")          # 81 GiB: over the cap
"""


def test_the_80_gib_cap_refuses_what_an_h100_could_not_hold():
    """``benchmark.device_memory_gib = 80`` in a fresh process (the cap is process-wide)."""
    proc = subprocess.run([sys.executable, "-c", _CAP_PROBE], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    if "fraction None" in proc.stdout:
        assert proc.returncode == 0, proc.stderr[-3000:]
        return
    assert proc.returncode != 0, "81 GiB were allocated under an 80 GiB cap"
    assert classify_failure(proc.returncode, proc.stderr) == "device", proc.stderr[-3000:]
