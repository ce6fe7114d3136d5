"""Sequence-tiled SwiGLU MLP (ALST-style "TiledMLP") with an exact hand-written backward.

TorchTitan's Llama3 ``FeedForward`` computes ``w2(silu(w1 x) * w3 x)``.  For a (B, S, dim)
input the hidden activations ``w1 x``, ``w3 x``, ``silu(w1 x)`` and their product are each
(B, S, hidden) with hidden ~ 3.5 dim (Llama3-8B), and autograd keeps several of them alive
until backward.  At multi-million-token contexts that dominates the activation memory.

:func:`tiled_mlp` splits the sequence into ``num_tiles`` tiles and processes one tile at a
time in forward *and* backward, so the hidden activations exist for one tile only:

* forward: for each tile ``x_t`` compute ``y_t = (silu(x_t W1^T) * (x_t W3^T)) W2^T`` into a
  preallocated (B, S, dim) output; save only ``x`` and the three weights for backward
  (no hidden activation is saved).
* backward: for each tile recompute ``h1 = x_t W1^T``, ``h3 = x_t W3^T``, ``s = silu(h1)``
  and, with ``g_t`` the output gradient of the tile,

  ``dW2 += g_t^T (s * h3)``, ``da = g_t W2``, ``dh3 = da * s``,
  ``dh1 = silu_backward(da * h3, h1)``, ``dx_t = dh1 W1 + dh3 W3``,
  ``dW1 += dh1^T x_t``, ``dW3 += dh3^T x_t``.

Memory bound (T = B*S tokens, n tiles, H = hidden): besides the inputs/weights, forward
holds the (T, dim) output plus O(T/n * H) transient hidden activations (about three tile
tensors) and saves nothing but references to ``x`` and the weights; backward holds the
(T, dim) input gradient, the three weight-gradient accumulators (float32 when the weights
are bf16/fp16) plus O(T/n * H) transients (about five tile tensors).  The untiled module
instead keeps ~4 * T * H saved activations between forward and backward.  The extra cost
is one recomputation of the two up-projections (about +1/3 of the MLP FLOPs in total, like
activation checkpointing of the MLP).

The result is exact: the same per-token math as the untiled module (float64 results agree
to rounding, ~1e-15).  For bf16/fp16 weights the weight gradients are accumulated across
tiles in float32 (each tile's product formed from upcast operands) and cast to the
parameter dtype once at the end.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch.autograd.function import once_differentiable

from ..cp.precision import accumulation_dtype
from ._common import add_mm_, autocast_dtype, clamp_tiles, split

__all__ = [
    "tiled_mlp",
    "tiled_mlp_forward",
    "tiled_mlp_backward",
    "auto_num_tiles",
    "TiledMLPMixin",
    "apply_tiled_mlp",
    "tiled_mlp_class",
]


def auto_num_tiles(seq_len: int, dim: int) -> int:
    """ALST's default tile count: ``ceil(seq_len / dim)``, at least 1.

    With this choice a tile holds about ``dim`` tokens, so one tile's (tokens, hidden)
    intermediate is about the size of one (hidden, dim) weight matrix.
    """
    if dim <= 0:
        raise ValueError(f"dim must be positive, got {dim}")
    return max(1, math.ceil(seq_len / dim))


def _check_plain(*tensors: torch.Tensor) -> None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return
    if any(isinstance(t, DTensor) for t in tensors):
        raise NotImplementedError(
            "tiled_mlp works on plain (local) tensors; tensor-parallel DTensor weights are "
            "not supported (FSDP-only unsharded parameters are plain tensors and are fine)"
        )


# --------------------------------------------------------------------------- pure pair


def tiled_mlp_forward(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                      num_tiles: int) -> torch.Tensor:
    """``w2(silu(w1 x) * w3 x)`` computed tile by tile along dim 1 (no autograd graph)."""
    if x.dim() != 3:
        raise ValueError(f"tiled_mlp expects x of shape (B, S, dim), got {tuple(x.shape)}")
    b, s, _ = x.shape
    n = clamp_tiles(num_tiles, s)
    out = None
    offset = 0
    for xt in split(x, n, 1):
        st = xt.shape[1]
        a = F.silu(F.linear(xt, w1), inplace=True)
        yt = F.linear(a.mul_(F.linear(xt, w3)), w2)
        del a
        if out is None:
            out = x.new_empty((b, s, yt.shape[-1]), dtype=yt.dtype)
        out[:, offset : offset + st].copy_(yt)
        offset += st
        del yt
    return out


def tiled_mlp_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    num_tiles: int,
    needs_grad: tuple[bool, bool, bool, bool] = (True, True, True, True),
) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(dx, dW1, dW2, dW3)`` of :func:`tiled_mlp_forward`, recomputed per tile.

    ``needs_grad`` selects which of the four are computed (the others are returned as None).
    """
    need_x, need_w1, need_w2, need_w3 = needs_grad
    b, s, dim = x.shape
    n = clamp_tiles(num_tiles, s)
    dx = torch.empty_like(x) if need_x else None
    dw1 = torch.zeros(w1.shape, dtype=accumulation_dtype(w1.dtype), device=w1.device) if need_w1 else None
    dw2 = torch.zeros(w2.shape, dtype=accumulation_dtype(w2.dtype), device=w2.device) if need_w2 else None
    dw3 = torch.zeros(w3.shape, dtype=accumulation_dtype(w3.dtype), device=w3.device) if need_w3 else None
    need_hidden_grad = need_x or need_w1 or need_w3

    offset = 0
    for xt, gt in zip(split(x, n, 1), split(grad_out, n, 1)):
        st = xt.shape[1]
        x2 = xt.reshape(-1, dim)
        g2 = gt.reshape(-1, gt.shape[-1])
        h1 = F.linear(x2, w1)
        h3 = F.linear(x2, w3)
        sa = F.silu(h1)
        if need_w2:
            a = sa * h3
            add_mm_(dw2, g2.t(), a)
            del a
        if need_hidden_grad:
            da = torch.mm(g2, w2)
            dh3 = da * sa
            del sa
            ds = da.mul_(h3)
            del h3, da
            dh1 = torch.ops.aten.silu_backward(ds, h1)
            del ds, h1
            if need_x:
                dxt = torch.mm(dh1, w1)
                dxt.add_(torch.mm(dh3, w3))
                dx[:, offset : offset + st].copy_(dxt.view(b, st, dim))
                del dxt
            if need_w1:
                add_mm_(dw1, dh1.t(), x2)
            if need_w3:
                add_mm_(dw3, dh3.t(), x2)
            del dh1, dh3
        else:
            del sa, h1, h3
        offset += st

    def _cast(acc, w):
        return None if acc is None else acc.to(w.dtype)

    return dx, _cast(dw1, w1), _cast(dw2, w2), _cast(dw3, w3)


class _TiledMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w2, w3, num_tiles):
        ctx.num_tiles = num_tiles
        ctx.save_for_backward(x, w1, w2, w3)
        return tiled_mlp_forward(x, w1, w2, w3, num_tiles)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, w1, w2, w3 = ctx.saved_tensors
        dx, dw1, dw2, dw3 = tiled_mlp_backward(
            grad_out, x, w1, w2, w3, ctx.num_tiles, tuple(ctx.needs_input_grad[:4])
        )
        return dx, dw1, dw2, dw3, None


def tiled_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    num_tiles: int,
) -> torch.Tensor:
    """Exact, sequence-tiled ``w2(silu(w1 x) * w3 x)`` (bias-free SwiGLU MLP).

    Args:
        x: (B, S, dim) input.
        w1, w3: (hidden, dim) ``nn.Linear`` weights; w2: (dim, hidden).
        num_tiles: number of sequence tiles (``torch.tensor_split`` along dim 1, so it need
            not divide S; values above S are clamped to S).

    Under an active autocast region the floating inputs are cast to the autocast dtype
    (as autocast would do for ``F.linear``) and the tiles run with autocast disabled.
    See the module docstring for the algorithm and the memory bound.
    """
    _check_plain(x, w1, w2, w3)
    ac = autocast_dtype(x)
    if ac is not None:
        x, w1, w2, w3 = (
            t.to(ac) if t.is_floating_point() and t.dtype != torch.float64 else t
            for t in (x, w1, w2, w3)
        )
        with torch.autocast(x.device.type, enabled=False):
            return _TiledMLPFunction.apply(x, w1, w2, w3, num_tiles)
    return _TiledMLPFunction.apply(x, w1, w2, w3, num_tiles)


# --------------------------------------------------------------------------- modules


class TiledMLPMixin:
    """Forward override for any module with bias-free ``w1``/``w2``/``w3`` ``nn.Linear``
    children computing ``w2(silu(w1 x) * w3 x)``.

    ``num_tiles`` (instance attribute, also an ``__init__`` keyword): an int, or None for
    :func:`auto_num_tiles` ``(S, dim)`` at every call.  Parameters, buffers and state-dict
    keys are the base class's own (nothing is added or renamed).
    """

    num_tiles: int | None = None

    def __init__(self, *args, num_tiles: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.num_tiles = num_tiles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.num_tiles
        if n is None:
            n = auto_num_tiles(x.shape[1], x.shape[-1])
        return tiled_mlp(x, self.w1.weight, self.w2.weight, self.w3.weight, n)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        tiles = "auto" if self.num_tiles is None else self.num_tiles
        return f"{base}, num_tiles={tiles}" if base else f"num_tiles={tiles}"


@functools.cache
def tiled_mlp_class(cls: type) -> type:
    """``Tiled<cls>``: ``cls`` with :class:`TiledMLPMixin`'s forward, one class per ``cls``
    (so ``isinstance`` against it holds for every module :func:`apply_tiled_mlp` converted)."""
    if issubclass(cls, TiledMLPMixin):
        return cls
    name = f"Tiled{cls.__name__}"
    return type(name, (TiledMLPMixin, cls), {"__module__": __name__, "__qualname__": name})


def apply_tiled_mlp(module: nn.Module, num_tiles: int | None = None) -> nn.Module:
    """Make ``module`` (any module with bias-free ``nn.Linear`` children ``w1``/``w2``/``w3``
    computing ``w2(silu(w1 x) * w3 x)``, such as TorchTitan's ``FeedForward``) run
    :func:`tiled_mlp`, in place, and return it.

    Only the instance's class is swapped, to :func:`tiled_mlp_class` of it: the parameters,
    their names, the state dict and methods such as ``init_weights`` are untouched.  Calling
    it again just updates ``num_tiles`` (None = :func:`auto_num_tiles` per call).  Apply it
    before wrapping the module (activation checkpointing, ``fully_shard``, ``torch.compile``)
    or to the wrapped inner module.
    """
    if isinstance(module, TiledMLPMixin):
        module.num_tiles = num_tiles
        return module
    for name in ("w1", "w2", "w3"):
        lin = getattr(module, name, None)
        if not isinstance(lin, nn.Linear):
            raise TypeError(f"{type(module).__name__}.{name} is not an nn.Linear")
        if lin.bias is not None:
            raise ValueError(f"{type(module).__name__}.{name} has a bias; tiled_mlp is bias-free")
    if num_tiles is not None:
        clamp_tiles(num_tiles, 1)  # validates >= 1
    module.__class__ = tiled_mlp_class(type(module))
    module.num_tiles = num_tiles
    return module
