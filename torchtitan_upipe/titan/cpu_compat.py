"""Run TorchTitan 0.2.2's trainer on CPU with gloo: a small, explicit compatibility layer.

TorchTitan 0.2.2 assumes an accelerator in a few places.  When (and only when) CUDA is
absent, :func:`cpu_compat` patches exactly these while it is active, and restores them on
exit; enter it before ``torchtitan`` is first imported (``train.py`` does):

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

Nothing here changes behaviour on a machine with CUDA: :func:`cpu_compat` then patches
nothing.
"""

from __future__ import annotations

import contextlib
import os
import platform
from types import SimpleNamespace
from typing import Iterator

import torch
import torch.distributed as dist

_MISSING = object()


@contextlib.contextmanager
def cpu_compat() -> Iterator[bool]:
    """Patch the three CPU gaps above while active, if CUDA is absent; yield whether it did.
    Every attribute it set is restored (or removed) on exit."""
    if torch.cuda.is_available():
        yield False
        return
    import torch._utils as tu

    probe = tu._get_available_device_type
    cpu_attrs = _cpu_device_module()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(tu, "_get_available_device_type", lambda: probe() or "cpu"))
        for attr, value in cpu_attrs.items():
            stack.enter_context(_patched(torch.cpu, attr, value))
        stack.enter_context(_patched(dist, "barrier", _gloo_barrier(dist.barrier)))
        yield True


@contextlib.contextmanager
def _patched(owner, attr: str, value) -> Iterator[None]:
    previous = getattr(owner, attr, _MISSING)
    setattr(owner, attr, value)
    try:
        yield
    finally:
        if previous is _MISSING:
            delattr(owner, attr)
        else:
            setattr(owner, attr, previous)


def _host_ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _rss_stats() -> dict[str, int]:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"active_bytes.all.peak": peak, "reserved_bytes.all.peak": peak}


def _cpu_device_module() -> dict[str, object]:
    """The ``torch.cpu`` attributes TorchTitan needs: the missing ones, ``current_device``
    as an index (torch's returns the string "cpu") and a no-op ``set_device``."""
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
    attrs: dict[str, object] = {k: fn for k, fn in defaults.items() if not hasattr(cpu, k)}
    attrs["current_device"] = lambda: 0
    if getattr(cpu, "set_device", None) is None:
        attrs["set_device"] = lambda device: None
    return attrs


def _gloo_barrier(original):
    """``dist.barrier`` that drops ``device_ids`` for backends other than NCCL."""

    def barrier(group=None, async_op=False, device_ids=None):
        backend = dist.get_backend(group)
        if device_ids is not None and "nccl" not in str(backend):
            device_ids = None
        return original(group=group, async_op=async_op, device_ids=device_ids)

    return barrier


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
