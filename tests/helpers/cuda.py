"""What the CUDA tests share: the marker that skips them without a GPU, and tolerances.

``CUDA`` marks a test module ``cuda`` and skips it, with the reason, where torch sees no CUDA
device, so ``pytest -m cuda`` on a CPU machine reports every such test as skipped, never as
passed.  The comparison tolerances are TransformerEngine's for attention in low precision
(``tests/pytorch/attention``: bf16 ``2.5e-2`` with MHA and ``3.5e-2`` with GQA, fp16 ``5e-3``),
with its RMSE bound: the root-mean-square error at most 1% of the reference's range.
"""

from __future__ import annotations

import pytest
import torch

CUDA = [pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def te_tolerance(dtype: torch.dtype, gqa: bool) -> float:
    """TransformerEngine's atol = rtol for attention outputs and gradients in ``dtype``."""
    if dtype == torch.bfloat16:
        return 3.5e-2 if gqa else 2.5e-2
    if dtype == torch.float16:
        return 5e-3
    raise ValueError(f"no low-precision tolerance for {dtype}")


def assert_te_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """``assert_close`` at ``tol`` and RMSE <= 1% of the range of both tensors (TE's check).

    The absolute tolerance is ``tol`` times the reference's largest magnitude where that
    exceeds 1: a dK/dV row summed over hundreds of queries (and GQA's replicas) is a value
    of several units, which bf16 holds to 2^-6 of it, however small its neighbours are."""
    a, e = actual.float(), expected.float()
    atol = tol * max(1.0, e.abs().max().item())
    torch.testing.assert_close(a, e, atol=atol, rtol=tol, msg=lambda m: f"{what}: {m}")
    rmse = (a - e).pow(2).mean().sqrt().item()
    span = (torch.maximum(a.max(), e.max()) - torch.minimum(a.min(), e.min())).item()
    assert rmse <= 0.01 * span, f"{what}: RMSE {rmse:.3e} > 1% of the range {span:.3e}"


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.float() - expected.float()).abs().max().item()
