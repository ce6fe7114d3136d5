"""Host buffers of exactly the size asked for: pinned (page-locked in place) or pageable.

``torch.empty(..., pin_memory=True)`` goes through torch's caching host allocator, which rounds
every block up to the next power of two: a 5 GiB block input (Llama3-8B at 5M tokens on 8
ranks) pins 8 GiB, 248 GiB per rank where 155 GiB are needed.  :class:`HostMemory` allocates
a pageable tensor of the exact size and page-locks that range in place with
``cudaHostRegister`` (``cudaHostUnregister`` when it is freed), so what is pinned is what is
needed and device copies from and to it are asynchronous.  ``pinned=False`` leaves the
buffers pageable: no page-locked memory at all (the paper turned pinning off above 4M
tokens), at the price of copies that the host waits for.

``register(ptr, nbytes)`` and ``unregister(ptr)`` default to the CUDA runtime's; tests pass
their own to check the accounting without a GPU.  ``allocate(make)``, if given, runs every
allocation (``make()`` returns the new CPU tensor): the CPU memory estimator counts host
buffers apart from device memory that way, from the moment they exist.
"""

from __future__ import annotations

from typing import Callable

import torch

Allocate = Callable[[Callable[[], torch.Tensor]], torch.Tensor]
"""``allocate(make)``: make one host buffer (``make()``) and return it."""


def _check_register(err: int, nbytes: int) -> None:
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes of host memory failed with CUDA "
                           f"error {int(err)}: out of page-lockable memory? Set "
                           f"memory.offload_pinned = false to keep the buffers pageable")


def _cuda_register(ptr: int, nbytes: int) -> None:
    _check_register(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0), nbytes)


def _cuda_unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


class HostMemory:
    """Exact-size host buffers; pinned ones are page-locked while this object holds them."""

    def __init__(self, pinned: bool,
                 register: Callable[[int, int], None] | None = None,
                 unregister: Callable[[int], None] | None = None,
                 allocate: Allocate | None = None) -> None:
        self.pinned = pinned
        self._allocate = allocate
        self._register = register or _cuda_register
        self._unregister = unregister or _cuda_unregister
        # data pointer -> the buffer: held until unlocked, so no page is freed while locked
        self._registered: dict[int, torch.Tensor] = {}

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized CPU tensor of exactly ``shape``; page-locked if ``pinned``."""
        def make() -> torch.Tensor:
            return torch.empty(shape, dtype=dtype, device="cpu")

        t = make() if self._allocate is None else self._allocate(make)
        nbytes = t.untyped_storage().nbytes()
        if self.pinned and nbytes:
            self._register(t.data_ptr(), nbytes)
            self._registered[t.data_ptr()] = t
        return t

    def like(self, buf: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """``buf`` if it has ``x``'s shape and dtype, else a new buffer for ``x`` (``buf`` freed)."""
        if buf is not None and buf.shape == x.shape and buf.dtype == x.dtype:
            return buf
        if buf is not None:
            self.free(buf)
        return self.empty(x.shape, x.dtype)

    def free(self, t: torch.Tensor) -> None:
        """Unlock ``t``'s pages; call before dropping the last reference to a buffer."""
        if self._registered.pop(t.data_ptr(), None) is not None:
            self._unregister(t.data_ptr())

    def close(self) -> None:
        """Unlock every buffer still held (then their memory can be returned)."""
        for ptr in list(self._registered):
            self._unregister(ptr)
        self._registered.clear()

    @property
    def pinned_bytes(self) -> int:
        """Bytes page-locked now: the exact sizes of the pinned buffers."""
        return sum(t.untyped_storage().nbytes() for t in self._registered.values())
