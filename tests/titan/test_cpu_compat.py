"""The CPU compatibility layer patches only while active and restores everything on exit."""

import torch
import torch._utils as tu
import torch.distributed as dist

from torchtitan_upipe.titan.cpu_compat import cpu_compat


def _state():
    attrs = ("get_device_name", "get_device_properties", "memory_stats", "reset_peak_memory_stats",
             "empty_cache", "current_device", "set_device")
    return (tu._get_available_device_type, dist.barrier,
            {a: getattr(torch.cpu, a, None) for a in attrs})


def test_patches_while_active_and_restores():
    before = _state()
    with cpu_compat() as active:
        if torch.cuda.is_available():
            assert not active and _state() == before  # nothing to do with CUDA
        else:
            assert active
            assert tu._get_available_device_type() == "cpu"
            assert torch.cpu.current_device() == 0
            assert torch.cpu.get_device_properties().total_memory > 0
            assert "active_bytes.all.peak" in torch.cpu.memory_stats()
            assert dist.barrier is not before[1]
    assert _state() == before
