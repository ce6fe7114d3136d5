"""Attention kernels behind one interface (see :mod:`.base` for the layout contract).

``[context_parallel] kernel`` picks one by name:

=============== ===============================================================
``auto``        on Hopper ``cudnn``, else ``flash_attn`` when importable on CUDA, else
                ``sdpa`` (:func:`~.registry.auto_kernel_name`)
``sdpa``        torch's own flash kernel (CUDA: FlashAttention-2 in aten; CPU: the
                CPU flash kernel)
``cudnn``       torch's cuDNN attention (CUDA only)
``flash_attn``  the ``flash-attn`` package (CUDA only, optional extra ``.[flash]``)
``math``        exact attention in tensor algebra, any device and dtype
=============== ===============================================================
"""

from __future__ import annotations

from .base import AttentionKernel, check_shapes
from .registry import (
    KERNEL_CHOICES,
    auto_kernel_name,
    get_kernel,
    register_kernel,
    resolve_kernel,
    resolve_kernel_and_scale,
)

from .autograd import kernel_attention
# the backends register themselves (register_kernel) on import
from .cudnn import CudnnKernel
from .flash_attn import FlashAttnKernel
from .math import MathKernel
from .sdpa import SdpaKernel

__all__ = [
    "AttentionKernel",
    "CudnnKernel",
    "FlashAttnKernel",
    "KERNEL_CHOICES",
    "MathKernel",
    "SdpaKernel",
    "auto_kernel_name",
    "check_shapes",
    "get_kernel",
    "kernel_attention",
    "register_kernel",
    "resolve_kernel",
    "resolve_kernel_and_scale",
]
