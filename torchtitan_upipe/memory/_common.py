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


def add_mm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc += a @ b`` with the product formed in ``acc.dtype`` (operands upcast if needed).

    For bf16/fp16 operands with a float32 accumulator the operands of one tile are upcast,
    so every tile's partial sum is exact float32 (no per-tile rounding to low precision).
    """
    if a.dtype != acc.dtype:
        a = a.to(acc.dtype)
    if b.dtype != acc.dtype:
        b = b.to(acc.dtype)
    return acc.addmm_(a, b)
