"""The optimizer's state in host memory while the step's forward and backward run.

Adam keeps two fp32 tensors per parameter (``exp_avg``, ``exp_avg_sq``): ``8 P / N`` bytes
per rank with FSDP over N ranks, 7.5 GiB for Llama3-8B on 8 ranks and more than a third of
the model states at the peak of a long-context step, which is in the backward, where the
state is not used.  :class:`OptimizerStateOffloader` moves it out for that time:

* :meth:`~OptimizerStateOffloader.offload` (before the forward): copy every state tensor that
  lives on ``device`` into a host buffer of exactly its size (reused from step to step), then
  free its device storage (``untyped_storage().resize_(0)``).  The tensor objects stay what
  they were, DTensor wrappers and the optimizer's references included; only their storage is
  empty.
* :meth:`~OptimizerStateOffloader.reload` (a pre-hook of ``optimizer.step``): regrow each
  storage and copy the bytes back.  Byte for byte the same state: exact.

Both copies run on the current stream, so they are ordered with the optimizer step and the
next forward without events; they are ``non_blocking`` into and out of pinned buffers, and
synchronous with pageable ones.  Scalars (Adam's ``step`` counters) and tensors not on
``device`` are left alone.  Between a reload and the next offload the state is on the device
as usual, so checkpoints save and load it unchanged.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from .host import HostMemory


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor holding ``t``'s bytes on this rank (a DTensor's local shard)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


class OptimizerStateOffloader:
    """Offload and reload the state of ``optimizers`` (``torch.optim.Optimizer`` objects)."""

    def __init__(self, optimizers: Iterable[torch.optim.Optimizer], device: torch.device,
                 memory: HostMemory) -> None:
        self.optimizers = list(optimizers)
        self.device = device
        self.memory = memory
        self._host: dict[tuple[int, int, str], torch.Tensor] = {}
        self.offloaded = False

    def _state(self) -> Iterator[tuple[tuple[int, int, str], torch.Tensor]]:
        """``(key, local tensor)`` of every tensor in the optimizers' state."""
        for i, opt in enumerate(self.optimizers):
            for j, state in enumerate(opt.state.values()):
                for name, value in state.items():
                    if isinstance(value, torch.Tensor):
                        yield (i, j, name), _local(value)

    def _tensors(self) -> Iterator[tuple[tuple[int, int, str], torch.Tensor]]:
        """``(key, local tensor)`` of every state tensor on the device with bytes."""
        for key, local in self._state():
            if local.device.type != self.device.type or local.dim() == 0:
                continue
            if local.untyped_storage().nbytes() != local.numel() * local.element_size():
                raise ValueError(
                    f"optimizer state {key[2]!r} does not cover its storage (a view, "
                    f"{local.numel() * local.element_size()} of "
                    f"{local.untyped_storage().nbytes()} bytes): it cannot be offloaded")
            yield key, local

    def offload(self) -> None:
        """Copy the state to host memory and free its device storage (no-op if offloaded)."""
        if self.offloaded:
            return
        with torch.no_grad():
            for key, local in self._tensors():
                buf = self._host[key] = self.memory.like(self._host.get(key), local)
                buf.copy_(local, non_blocking=self.memory.pinned)
                local.untyped_storage().resize_(0)
        self.offloaded = True

    def reload(self) -> None:
        """Regrow the state's device storage and copy it back (no-op unless offloaded)."""
        if not self.offloaded:
            return
        with torch.no_grad():
            for key, local in self._state():
                buf = self._host.get(key)
                if buf is None:
                    continue
                local.untyped_storage().resize_(buf.numel() * buf.element_size())
                local.copy_(buf, non_blocking=self.memory.pinned)
        self.offloaded = False

    def host_bytes(self) -> int:
        """Bytes of the host buffers (the state's size once it has been offloaded)."""
        return sum(b.untyped_storage().nbytes() for b in self._host.values())

    def close(self) -> None:
        """Free the host buffers (unlock pinned ones)."""
        for buf in self._host.values():
            self.memory.free(buf)
        self._host.clear()
