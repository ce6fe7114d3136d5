"""Whole-block activation checkpointing with the saved block inputs offloaded to host memory.

With full activation checkpointing a transformer block keeps exactly one tensor between
forward and backward: its input ``x`` (``(B, S/C, dim)``; 5.4 GB per layer for Llama3-8B at
5M tokens over 8 ranks).  :class:`OffloadedCheckpointBlock` keeps that tensor in (pinned) host
memory instead:

* **forward**: run the block without autograd; copy ``x`` to a reusable pinned host buffer
  on a side stream (``non_blocking``; ``x.record_stream`` keeps its GPU block alive until the
  copy ends, then the caching allocator reuses it) and drop the GPU reference.
* **backward**: wait for the copy back of ``x`` (started one layer earlier, see prefetch),
  recompute the block with autograd, backpropagate ``dout`` through it, return ``dx``, and
  (``prefetch=True``) start copying the *previous* layer's input back on the side stream so
  that transfer overlaps this layer's recompute and backward.  Prefetching holds one more
  block input on the device during a layer's backward, where the step peaks; at the memory
  limit ``prefetch=False`` trades that for one exposed host-to-device copy per layer
  (milliseconds, against minutes of attention per layer at millions of tokens).

This is re-entrant checkpointing: parameter gradients are accumulated by the inner
``torch.autograd.backward`` into the (FSDP-unsharded) parameters' ``.grad``, and FSDP2's
post-backward hook, which fires once ``dx`` is returned, reduce-scatters them.  Apply it
before ``fully_shard`` (as TorchTitan applies activation checkpointing).

The recomputed block output is only the root of the inner backward: when its ``grad_fn`` is
the block's residual add (which saves no tensors), its storage is released before the inner
backward runs, so the step's peak holds one block-sized tensor less.

Layers ``< keep_layers`` are checkpointed the same way but keep their input on the device
(the paper keeps layer 0).  On a machine without CUDA the "host" copy is an ordinary CPU
tensor copy, so the same code path (buffers, ordering, prefetch) runs in CPU tests.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn


class HostOffloader:
    """Reusable host buffers, one per layer, and the side stream that fills and drains them."""

    _buffer_observers: list[Callable[[torch.Tensor], None]] = []

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._host: dict[int, torch.Tensor] = {}
        self._done: dict[int, torch.cuda.Event | None] = {}
        self._reloaded: dict[int, tuple[torch.Tensor, torch.cuda.Event | None]] = {}
        self._shape: dict[int, tuple] = {}

    def _buffer(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        buf = self._host.get(layer)
        if buf is None or buf.shape != x.shape or buf.dtype != x.dtype:
            buf = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=self.cuda)
            self._host[layer] = buf
            for observe in HostOffloader._buffer_observers:
                observe(buf)
        return buf

    def host_bytes(self) -> int:
        """Bytes of the host buffers allocated so far (one per offloaded layer)."""
        return sum(b.untyped_storage().nbytes() for b in self._host.values())

    @classmethod
    @contextlib.contextmanager
    def on_new_buffer(cls, observe: Callable[[torch.Tensor], None]) -> Iterator[None]:
        """Call ``observe(buffer)`` for every host buffer allocated inside the block.  The CPU
        memory estimator uses it to count host buffers apart from device memory."""
        cls._buffer_observers.append(observe)
        try:
            yield
        finally:
            cls._buffer_observers.remove(observe)

    def offload(self, layer: int, x: torch.Tensor) -> None:
        buf = self._buffer(layer, x)
        self._shape[layer] = (x.shape, x.dtype)
        self._reloaded.pop(layer, None)
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                buf.copy_(x, non_blocking=True)
                x.record_stream(self.stream)
                ev = torch.cuda.Event()
                ev.record(self.stream)
            self._done[layer] = ev
        else:
            buf.copy_(x)
            self._done[layer] = None

    def prefetch(self, layer: int) -> None:
        """Start copying ``layer``'s input back to the device (no-op if not offloaded)."""
        if layer not in self._shape or layer in self._reloaded:
            return
        buf = self._host[layer]
        if self.cuda:
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(self._done[layer])
                x = torch.empty(buf.shape, dtype=buf.dtype, device=self.device)
                x.copy_(buf, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.stream)
            self._reloaded[layer] = (x, ev)
        else:
            self._reloaded[layer] = (buf.clone(), None)

    def reload(self, layer: int) -> torch.Tensor:
        self.prefetch(layer)
        x, ev = self._reloaded.pop(layer)
        if ev is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ev)
            x.record_stream(current)
        return x


def _release_if_unsaved(out: torch.Tensor) -> None:
    """Free ``out``'s storage when no autograd node can read it: its producer is an add
    (``AddBackward0`` saves no tensors) and nothing else references the tensor's storage."""
    fn = out.grad_fn
    if fn is not None and type(fn).__name__ == "AddBackward0" and out._base is None:
        out.untyped_storage().resize_(0)


class _OffloadedCheckpoint(torch.autograd.Function):
    release_output = True  # tests switch it off to measure what it saves

    @staticmethod
    def forward(ctx, x, block, layer, offloader, prefetch, args, kwargs):
        with torch.no_grad():
            out = block(x, *args, **kwargs)
        ctx.block, ctx.layer, ctx.offloader, ctx.prefetch = block, layer, offloader, prefetch
        ctx.args, ctx.kwargs = args, kwargs
        ctx.requires_x_grad = x.requires_grad
        if offloader is None:
            ctx.save_for_backward(x)
        else:
            offloader.offload(layer, x)
        return out

    @staticmethod
    def backward(ctx, dout):
        if ctx.offloader is None:
            (x,) = ctx.saved_tensors
        else:
            x = ctx.offloader.reload(ctx.layer)
            if ctx.prefetch:
                ctx.offloader.prefetch(ctx.layer - 1)  # overlaps with this layer's recompute
        x = x.detach().requires_grad_(ctx.requires_x_grad)
        with torch.enable_grad():
            out = ctx.block(x, *ctx.args, **ctx.kwargs)
        if _OffloadedCheckpoint.release_output:
            _release_if_unsaved(out)
        torch.autograd.backward(out, dout)
        return x.grad, None, None, None, None, None, None


def apply_offloaded_ac(
    model: nn.Module, keep_layers: int, device: torch.device, prefetch: bool = True
) -> HostOffloader:
    """Checkpoint every block of ``model.layers``; offload inputs of layers ``>= keep_layers``.

    Parameter FQNs and the state dict are unchanged (no wrapper module is inserted): each
    block instance's ``forward`` is routed through the checkpoint function, so module hooks
    (FSDP's unshard/reshard) still run around it.
    """
    offloader = HostOffloader(device)
    model.host_offloader = offloader  # a plain attribute: not a submodule, not in the state dict
    for name, block in model.layers.items():
        layer = int(name)
        _wrap_forward(block, layer, offloader if layer >= keep_layers else None, prefetch)
    return offloader


def _wrap_forward(block: nn.Module, layer: int, offloader: HostOffloader | None, prefetch: bool) -> None:
    inner = block.forward

    def forward(x, *args, **kwargs):
        if not torch.is_grad_enabled():
            return inner(x, *args, **kwargs)
        return _OffloadedCheckpoint.apply(x, inner, layer, offloader, prefetch, args, kwargs)

    block.forward = forward
