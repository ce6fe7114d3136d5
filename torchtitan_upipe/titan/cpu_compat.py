"""Run TorchTitan 0.2.2's trainer on CPU with gloo: a small, explicit compatibility layer.

TorchTitan 0.2.2 assumes an accelerator in a few places.  When (and only when) CUDA is
absent, :func:`install` patches exactly these, before ``torchtitan`` is imported:

1. **Device detection.** ``torchtitan.tools.utils`` computes ``device_type`` at import time
   from ``torch._utils._get_available_device_type()``, which returns ``None`` on a CPU-only
   machine; TorchTitan then falls back to ``"cuda"`` and dies in ``torch.cuda.set_device``.
   We make that probe answer ``"cpu"``.
2. **Device module.** ``torch.cpu`` lacks the memory/introspection calls TorchTitan's
   ``DeviceMemoryMonitor`` and ``set_pg_timeouts`` use (``get_device_name``,
   ``get_device_properties``, ``memory_stats``, ``reset_peak_memory_stats``, ``empty_cache``,
   and an integer ``current_device``).  We add CPU versions: the device name is the host's
   processor, the capacity is the host's RAM, and the "peak" memory TorchTitan logs is the
   process's peak resident set size (``ru_maxrss``; it cannot be reset between steps).
3. **Barriers.** ``torch.distributed.barrier(device_ids=[...])`` is NCCL-only; gloo rejects
   ``device_ids``.  The CPU barrier drops that argument.

FSDP2's ``PREMUL_SUM`` reduction, which gloo does not implement, is handled where FSDP is
applied (:func:`use_sum_reductions`), not by patching torch.

Nothing here changes behaviour on a machine with CUDA: :func:`install` returns ``False``.
"""

from __future__ import annotations

import os
import platform
from types import SimpleNamespace

import torch
import torch.distributed as dist

_INSTALLED = False


def cuda_absent() -> bool:
    return not torch.cuda.is_available()


def install() -> bool:
    """Patch the three CPU gaps above if CUDA is absent.  Idempotent; returns whether active."""
    global _INSTALLED
    if _INSTALLED:
        return True
    if not cuda_absent():
        return False
    _patch_device_detection()
    _patch_cpu_device_module()
    _patch_barrier()
    _INSTALLED = True
    return True


def _patch_device_detection() -> None:
    import torch._utils as tu

    original = tu._get_available_device_type

    def _get_available_device_type():
        return original() or "cpu"

    tu._get_available_device_type = _get_available_device_type


def _host_ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _rss_stats() -> dict[str, int]:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"active_bytes.all.peak": peak, "reserved_bytes.all.peak": peak}


def _patch_cpu_device_module() -> None:
    cpu = torch.cpu
    name = platform.processor() or platform.machine() or "cpu"
    props = SimpleNamespace(name=name, total_memory=_host_ram_bytes())
    defaults = {
        "get_device_name": lambda device=None: name,
        "get_device_properties": lambda device=None: props,
        "memory_stats": lambda device=None: _rss_stats(),
        "reset_peak_memory_stats": lambda device=None: None,
        "empty_cache": lambda: None,
    }
    for attr, fn in defaults.items():
        if not hasattr(cpu, attr):
            setattr(cpu, attr, fn)
    # torch.cpu.current_device() returns the string "cpu"; TorchTitan passes it as a device index.
    cpu.current_device = lambda: 0
    if not hasattr(cpu, "set_device") or cpu.set_device is None:
        cpu.set_device = lambda device: None


def _patch_barrier() -> None:
    original = dist.barrier
    if getattr(original, "_upipe_cpu", False):
        return

    def barrier(group=None, async_op=False, device_ids=None):
        backend = dist.get_backend(group)
        if device_ids is not None and "nccl" not in str(backend):
            device_ids = None
        return original(group=group, async_op=async_op, device_ids=device_ids)

    barrier._upipe_cpu = True  # type: ignore[attr-defined]
    dist.barrier = barrier


def use_sum_reductions(model: torch.nn.Module) -> None:
    """Make every FSDP2 module reduce gradients with plain ``SUM`` (gloo has no PREMUL_SUM).

    TorchTitan sets the gradient divide factor to 1 (it normalizes the loss by the global
    token count itself), so FSDP asks for ``PREMUL_SUM(1.0)``; forcing sum reductions gives
    the same numbers with collectives gloo implements.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
