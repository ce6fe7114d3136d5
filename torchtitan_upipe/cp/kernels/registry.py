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


def auto_kernel_name(device_type: str, capability: tuple[int, int] | None = None,
                     available: tuple[str, ...] = ()) -> str:
    """What ``kernel = "auto"`` is on a device: the fastest exact kernel there.

    Hopper (sm90): cuDNN attention (about 690/580 TFLOP/s forward/backward on an H200, well
    above FlashAttention-2's), then the ``flash-attn`` package, then torch's FlashAttention-2
    (``sdpa``).  Other CUDA devices: ``flash-attn`` if installed, else ``sdpa``.  Any other
    device: ``sdpa`` (torch's CPU flash kernel).  ``available``: the kernels that can run
    there."""
    if device_type != "cuda":
        return "sdpa"
    order = ("cudnn", "flash_attn", "sdpa") if capability and capability[0] == 9 else ("flash_attn", "sdpa")
    return next((name for name in order if name in available), "sdpa")


def _auto_name(device: torch.device) -> str:
    if device.type != "cuda":
        return auto_kernel_name(device.type)
    available = tuple(name for name in ("cudnn", "flash_attn", "sdpa")
                      if name in _REGISTRY and not _REGISTRY[name]().unavailable_reason(device))
    # validating a CUDA job on a machine without CUDA: the device's generation is unknown
    capability = torch.cuda.get_device_capability(device) if torch.cuda.is_available() else None
    return auto_kernel_name("cuda", capability, available)
