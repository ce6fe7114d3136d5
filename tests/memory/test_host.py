"""Exact-size host buffers: what is page-locked is what is asked for (torch's caching host
allocator rounds every pinned block up to a power of two), and nothing with pinned=False."""

import torch

from torchtitan_upipe.memory import HostMemory


class _Locks:
    """Records page-locking calls (cudaHostRegister/Unregister stand-ins)."""

    def __init__(self):
        self.locked: dict[int, int] = {}
        self.calls = []

    def register(self, ptr, nbytes):
        self.calls.append(("register", nbytes))
        self.locked[ptr] = nbytes

    def unregister(self, ptr):
        self.calls.append(("unregister", self.locked.pop(ptr)))


def test_pinned_buffers_lock_exactly_their_bytes():
    locks = _Locks()
    memory = HostMemory(pinned=True, register=locks.register, unregister=locks.unregister)
    a = memory.empty((3, 5, 7), torch.float32)  # 420 bytes: a caching allocator would pin 512
    b = memory.empty((1000,), torch.bfloat16)
    assert a.shape == (3, 5, 7) and a.device.type == "cpu"
    assert locks.calls == [("register", 420), ("register", 2000)]
    assert memory.pinned_bytes == 2420 == sum(locks.locked.values())
    memory.free(a)
    assert locks.calls[-1] == ("unregister", 420) and memory.pinned_bytes == 2000
    memory.free(a)  # twice: nothing more
    memory.close()
    assert not locks.locked and memory.pinned_bytes == 0
    assert memory.empty((0,), torch.float32).numel() == 0 and locks.calls[-1] == ("unregister", 2000)


def test_pageable_buffers_lock_nothing():
    locks = _Locks()
    memory = HostMemory(pinned=False, register=locks.register, unregister=locks.unregister)
    t = memory.empty((64,), torch.float32)
    memory.free(t)
    memory.close()
    assert locks.calls == [] and memory.pinned_bytes == 0
