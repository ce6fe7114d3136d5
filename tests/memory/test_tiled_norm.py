"""Tiled RMSNorm: exact against ``F.rms_norm`` (float64), low precision, the module swap."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.helpers.numerics import DIM, S, TILES, assert_same_module, close, grads, leaf
from torchtitan_upipe.memory import TiledRMSNorm, apply_tiled_rms_norm, tiled_rms_norm



@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("num_tiles", TILES)
@pytest.mark.parametrize("eps", [None, 1e-5])
def test_tiled_rms_norm_matches_reference(batch, num_tiles, eps):
    g = torch.Generator().manual_seed(batch * 10 + num_tiles)
    x = leaf(batch, S, DIM, gen=g)
    w = (1 + 0.1 * torch.randn(DIM, dtype=torch.float64, generator=g)).requires_grad_()
    gy = torch.randn(batch, S, DIM, dtype=torch.float64, generator=g)

    ref = F.rms_norm(x, (DIM,), w, eps)
    out = tiled_rms_norm(x, w, eps, num_tiles)
    close(out, ref)
    for got, want in zip(grads(out, (x, w), gy), grads(ref, (x, w), gy)):
        close(got, want)

    # no affine weight
    ref = F.rms_norm(x, (DIM,), None, eps)
    out = tiled_rms_norm(x, None, eps, num_tiles)
    close(out, ref)
    close(grads(out, (x,), gy)[0], grads(ref, (x,), gy)[0])


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
    dx, dw = grads(out, (x, w), gy)
    dx_ref, dw_ref = grads(ref, (x, w), gy)
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

    assert_same_module(ref, tiled, seed=5)
