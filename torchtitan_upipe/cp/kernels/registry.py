"""Kernels by name: the ``[context_parallel] kernel`` choices and how ``auto`` resolves.

Backends register themselves with :func:`register_kernel` when :mod:`torchtitan_upipe.cp.kernels`
imports them.  :func:`resolve_kernel_and_scale` is the preamble every attention entry point
runs: a name (or an instance) to an :class:`AttentionKernel` for the tensors' device, and the
softmax scale, ``D ** -0.5`` unless given.
"""

from __future__ import annotations

import torch

from .base import AttentionKernel

KERNEL_CHOICES = ("auto", "sdpa", "cudnn", "flash_attn", "math")

_REGISTRY: dict[str, type[AttentionKernel]] = {}


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


def resolve_kernel_and_scale(
    kernel: "str | AttentionKernel", device: torch.device | str, head_dim: int,
    scale: float | None,
) -> tuple[AttentionKernel, float]:
    """The kernel (:func:`resolve_kernel`) and the softmax scale (default ``head_dim ** -0.5``)."""
    return resolve_kernel(kernel, device), head_dim**-0.5 if scale is None else float(scale)


def _auto_name(device: torch.device) -> str:
    if device.type == "cuda" and "flash_attn" in _REGISTRY:
        k = _REGISTRY["flash_attn"]()
        if not k.unavailable_reason(device):
            return "flash_attn"
    return "sdpa" if "sdpa" in _REGISTRY else "math"
