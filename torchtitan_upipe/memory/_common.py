"""Small helpers shared by the tiled ops (splitting, autocast, accumulating GEMMs).

Accumulators and op-math follow the package's one precision rule,
:func:`torchtitan_upipe.cp.precision.accumulation_dtype` (float64 stays float64, else float32).
"""

from __future__ import annotations

import torch


def clamp_tiles(num_tiles: int, length: int) -> int:
    """``num_tiles`` clamped to ``[1, length]`` (``tensor_split`` then never yields empty tiles)."""
    n = int(num_tiles)
    if n < 1:
        raise ValueError(f"num_tiles must be >= 1, got {num_tiles}")
    return max(1, min(n, length))


def split(t: torch.Tensor, num_tiles: int, dim: int) -> tuple[torch.Tensor, ...]:
    """``torch.tensor_split`` into ``num_tiles`` (already clamped) views along ``dim``."""
    return torch.tensor_split(t, num_tiles, dim=dim)


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype active for ``t``'s device, or None when autocast is off."""
    dev = t.device.type
    try:
        if torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
    except (RuntimeError, TypeError):  # device type without autocast support
        return None
    return None


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def add_mm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc += a @ b``, the product accumulated in ``acc.dtype``.

    bf16/fp16 operands into a float32 accumulator: on CUDA (and meta) one GEMM with bf16
    operands and float32 accumulation and output (``addmm(..., out_dtype=float32, out=acc)``:
    tensor-core speed, no per-tile rounding to low precision).  On CPU, which has no such
    kernel, the operands of one tile are upcast instead (exact float32 products).
    """
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        return acc.addmm_(a, b)
    if (acc.device.type in ("cuda", "meta") and acc.dtype == torch.float32
            and a.dtype == b.dtype and a.dtype in _LOW_PRECISION):
        return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    return acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))
