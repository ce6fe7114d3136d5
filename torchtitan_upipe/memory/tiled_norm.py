"""Sequence-tiled RMSNorm, exact to ``nn.RMSNorm`` / ``torch.nn.functional.rms_norm``.

``torch.rms_norm`` (torch 2.13, and its ``_fused_rms_norm`` decomposition) computes in the
op-math dtype ``c`` (float32 for bf16/fp16/fp32 inputs, float64 for float64)::

    xc   = x.to(c)
    rstd = rsqrt(mean(xc**2, -1, keepdim=True) + eps)   # eps=None -> finfo(c).eps
    y    = ((xc * rstd) * weight).to(x.dtype)            # weight promoted to c

and its backward (``_fused_rms_norm_backward``), with ``g = grad.to(c)``,
``xhat = xc * rstd``, ``gx = g * weight``::

    dx = ((gx - xhat / D * sum(xhat * gx, -1)) * rstd).to(x.dtype)
    dw = sum over tokens of (g * xhat)

:func:`tiled_rms_norm` evaluates exactly these formulas over ``num_tiles`` tiles of the
token dimension (dim -2, i.e. the sequence dim of a (B, S, D) input), so the op-math
(float32) copies of the input, the normalized input and the gradient exist for one tile at
a time.  Forward saves ``x``, ``weight`` and ``rstd`` (one value per token, op-math dtype);
the backward recomputes ``xhat`` per tile and accumulates ``dw`` across tiles in the
op-math dtype (float32 for bf16 weights), casting to the weight's dtype once at the end.

Memory bound (T tokens, D features, n tiles): forward holds the (T, D) output and
T values of ``rstd`` plus O(T/n * D) op-math transients; backward holds the (T, D) input
gradient, a D-sized accumulator plus O(T/n * D) op-math transients.  The untiled autograd
graph keeps a full op-math copy of the input (2x a bf16 input) and more.

Only normalization over the last dimension (``normalized_shape=(D,)``, TorchTitan's usage)
is tiled; the module wrapper falls back to ``F.rms_norm`` for other shapes.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch.autograd.function import once_differentiable

from ..cp.precision import accumulation_dtype
from ._common import clamp_tiles, split
from .tiled_mlp import auto_num_tiles

__all__ = [
    "tiled_rms_norm",
    "tiled_rms_norm_forward",
    "tiled_rms_norm_backward",
    "TiledRMSNorm",
    "apply_tiled_rms_norm",
]


def _eps(eps: float | None, cd: torch.dtype) -> float:
    return torch.finfo(cd).eps if eps is None else eps


def _tile_dim(x: torch.Tensor) -> int:
    if x.dim() < 2:
        raise ValueError("tiled_rms_norm expects x with at least 2 dims (..., tokens, D)")
    return x.dim() - 2


def tiled_rms_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float | None,
    num_tiles: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(y, rstd)``; ``rstd`` has ``x``'s shape with last dim 1, op-math dtype."""
    td = _tile_dim(x)
    n = clamp_tiles(num_tiles, x.shape[td])
    cd = accumulation_dtype(x.dtype)
    e = _eps(eps, cd)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    rstd = x.new_empty((*x.shape[:-1], 1), dtype=cd)
    for xt, yt, rt in zip(split(x, n, td), split(out, n, td), split(rstd, n, td)):
        xc = xt.to(cd)
        r = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True).add_(e))
        # (xc * r) * weight in op-math; in place only on our own upcast copy of the tile
        yc = xc.mul_(r) if xc is not xt else xc * r
        if weight is not None:
            yc = yc * weight
        yt.copy_(yc)  # cast back to x.dtype
        rt.copy_(r)
        del xc, yc, r
    return out, rstd


def tiled_rms_norm_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    num_tiles: int,
    needs_grad: tuple[bool, bool] = (True, True),
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(dx, dweight)`` of :func:`tiled_rms_norm_forward`, per tile."""
    need_x, need_w = needs_grad
    need_w = need_w and weight is not None
    td = _tile_dim(x)
    n = clamp_tiles(num_tiles, x.shape[td])
    cd = accumulation_dtype(x.dtype)
    d = x.shape[-1]
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
    dw = torch.zeros((d,), dtype=cd, device=x.device) if need_w else None
    wc = weight.to(cd) if weight is not None else None
    dx_tiles = split(dx, n, td) if need_x else (None,) * n
    tiles = zip(split(x, n, td), split(grad_out, n, td), split(rstd, n, td), dx_tiles)
    for xt, gt, rt, dxt in tiles:
        g = gt.to(cd)
        xhat = xt.to(cd) * rt
        if need_w:
            dw.add_((g * xhat).reshape(-1, d).sum(0))
        if need_x:
            gx = g * wc if wc is not None else g
            del g
            sum_val = (xhat * gx).sum(-1, keepdim=True)
            dxt.copy_((gx - (xhat / d) * sum_val) * rt)
            del gx, sum_val
        del xhat
    if need_w:
        dw = dw.to(weight.dtype)
    return dx, dw


class _TiledRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, num_tiles):
        y, rstd = tiled_rms_norm_forward(x, weight, eps, num_tiles)
        ctx.num_tiles = num_tiles
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = tiled_rms_norm_backward(
            grad_out, x, weight, rstd, ctx.num_tiles, tuple(ctx.needs_input_grad[:2])
        )
        return dx, dw, None, None


def tiled_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float | None,
    num_tiles: int,
) -> torch.Tensor:
    """Exact ``F.rms_norm(x, (D,), weight, eps)`` computed over ``num_tiles`` token tiles.

    Args:
        x: (..., tokens, D); tiles are ``torch.tensor_split`` pieces of dim -2 (the sequence
            dim of a (B, S, D) input); ``num_tiles`` > tokens is clamped.
        weight: (D,) or None.
        eps: as ``nn.RMSNorm`` (None -> ``finfo(op-math dtype).eps``).

    See the module docstring for the algorithm, dtypes and the memory bound.
    """
    if weight is not None and weight.shape != (x.shape[-1],):
        raise ValueError(f"weight shape {tuple(weight.shape)} != ({x.shape[-1]},)")
    if x.dim() == 1:
        return _TiledRMSNormFunction.apply(x.unsqueeze(0), weight, eps, 1).squeeze(0)
    return _TiledRMSNormFunction.apply(x, weight, eps, num_tiles)


class TiledRMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` computed with :func:`tiled_rms_norm` (state dict: just ``weight``).

    ``num_tiles``: an int, or None for :func:`auto_num_tiles` ``(tokens, D)`` per call.
    """

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None,
                 dtype=None, num_tiles: int | None = None):
        super().__init__(normalized_shape, eps, elementwise_affine, device=device, dtype=dtype)
        self.num_tiles = num_tiles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) != 1 or x.dim() < 2:
            return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
        n = self.num_tiles
        if n is None:
            n = auto_num_tiles(x.shape[-2], x.shape[-1])
        return tiled_rms_norm(x, self.weight, self.eps, n)

    def extra_repr(self) -> str:
        tiles = "auto" if self.num_tiles is None else self.num_tiles
        return f"{super().extra_repr()}, num_tiles={tiles}"


def apply_tiled_rms_norm(module: nn.RMSNorm, num_tiles: int | None = None) -> nn.RMSNorm:
    """Make an ``nn.RMSNorm`` instance compute with :func:`tiled_rms_norm`, in place.

    Only the instance's class is swapped (to :class:`TiledRMSNorm`); the ``weight``
    parameter and state-dict keys are unchanged.  Calling it again updates ``num_tiles``.
    """
    if isinstance(module, TiledRMSNorm):
        module.num_tiles = num_tiles
        return module
    if type(module) is not nn.RMSNorm:
        raise TypeError(f"apply_tiled_rms_norm expects an nn.RMSNorm, got {type(module).__name__}")
    if num_tiles is not None:
        clamp_tiles(num_tiles, 1)
    module.__class__ = TiledRMSNorm
    module.num_tiles = num_tiles
    return module
