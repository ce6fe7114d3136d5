"""Attention kernels behind one interface (see :mod:`.base` for the layout contract).

``[context_parallel] kernel`` picks one by name:

=============== ===============================================================
``auto``        ``flash_attn`` when importable on CUDA, else ``sdpa``
``sdpa``        torch's own flash kernel (CUDA: FlashAttention-2 in aten; CPU: the
                CPU flash kernel)
``cudnn``       torch's cuDNN attention (CUDA only)
``flash_attn``  the ``flash-attn`` package (CUDA only, optional extra ``.[flash]``)
``math``        exact attention in tensor algebra, any device and dtype
=============== ===============================================================
"""

from __future__ import annotations

import torch

from .base import AttentionKernel, check_shapes
from .math import MathKernel

KERNEL_CHOICES = ("auto", "sdpa", "cudnn", "flash_attn", "math")

_REGISTRY: dict[str, type[AttentionKernel]] = {"math": MathKernel}


def register_kernel(cls: type[AttentionKernel]) -> type[AttentionKernel]:
    """Class decorator: make a kernel selectable by its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def get_kernel(name: str, device: torch.device | str = "cpu") -> AttentionKernel:
    """Resolve a kernel name (including ``auto``) for ``device``.

    Raises ``ValueError`` naming ``context_parallel.kernel`` and the valid choices when the
    name is unknown or the kernel cannot run on ``device``.
    """
    device = torch.device(device)
    if name not in KERNEL_CHOICES:
        raise ValueError(
            f"context_parallel.kernel={name!r} is not one of {list(KERNEL_CHOICES)}"
        )
    if name == "auto":
        name = _auto_name(device)
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(
            f"context_parallel.kernel={name!r} is not available in this installation; "
            f"available: {sorted(_REGISTRY)}"
        )
    kernel = cls()
    reason = kernel.unavailable_reason(device)
    if reason:
        raise ValueError(f"context_parallel.kernel={name!r} cannot run on {device}: {reason}")
    return kernel


def resolve_kernel(kernel: "str | AttentionKernel", device: torch.device | str) -> AttentionKernel:
    """``kernel`` itself if it is an :class:`AttentionKernel`, else :func:`get_kernel` of the name."""
    return kernel if isinstance(kernel, AttentionKernel) else get_kernel(kernel, device)


def _auto_name(device: torch.device) -> str:
    if device.type == "cuda" and "flash_attn" in _REGISTRY:
        k = _REGISTRY["flash_attn"]()
        if not k.unavailable_reason(device):
            return "flash_attn"
    return "sdpa" if "sdpa" in _REGISTRY else "math"


# The backends register themselves with ``register_kernel`` on import, so they are imported
# after it is defined.
from .autograd import kernel_attention  # noqa: E402
from .cudnn import CudnnKernel  # noqa: E402
from .flash_attn import FlashAttnKernel  # noqa: E402
from .sdpa import SdpaKernel  # noqa: E402

__all__ = [
    "AttentionKernel",
    "CudnnKernel",
    "FlashAttnKernel",
    "KERNEL_CHOICES",
    "MathKernel",
    "SdpaKernel",
    "check_shapes",
    "get_kernel",
    "kernel_attention",
    "register_kernel",
    "resolve_kernel",
]
