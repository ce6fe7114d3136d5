"""Whole-block activation checkpointing with the saved block inputs offloaded to host memory.

With full activation checkpointing a transformer block keeps exactly one tensor between
forward and backward: its input ``x`` (``(B, S/C, dim)``; 5.4 GB per layer for Llama3-8B at
5M tokens over 8 ranks).  :class:`OffloadedCheckpointBlock` keeps that tensor in (pinned) host
memory instead:

* **forward**: run the block without autograd; copy ``x`` to a reusable host buffer of
  exactly its size (page-locked by default, :mod:`.host`) on a side stream (``non_blocking``; ``x.record_stream`` keeps its GPU block alive until the
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

from dataclasses import dataclass
import weakref
from typing import Callable

import torch
from torch import nn

from .host import HostMemory


class HostOffloader:
    """Reusable host buffers, one per layer, and the side stream that fills and drains them.

    ``on_new_buffer(buffer)``, if given, is called for every host buffer allocated (the CPU
    memory estimator counts host buffers apart from device memory with it).  On CUDA the
    buffers are pinned (``pinned=True``, exactly their size) or pageable; ``host_memory``
    replaces the allocator (tests).  Without CUDA they are ordinary CPU tensors.
    """

    def __init__(self, device: torch.device,
                 on_new_buffer: Callable[[torch.Tensor], None] | None = None,
                 pinned: bool = True, host_memory: HostMemory | None = None) -> None:
        self.device = device
        self.on_new_buffer = on_new_buffer
        self.cuda = device.type == "cuda"
        self.memory = host_memory or HostMemory(pinned=pinned and self.cuda)
        weakref.finalize(self, self.memory.close)
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._host: dict[int, torch.Tensor] = {}
        self._done: dict[int, torch.cuda.Event | None] = {}
        self._reloaded: dict[int, tuple[torch.Tensor, torch.cuda.Event | None]] = {}
        self._shape: dict[int, tuple] = {}
        self.allocations = 0
        """Host buffers allocated so far: one per offloaded layer, then none while the block
        inputs keep their shape (a buffer is re-created only when its layer's input changes)."""

    def _buffer(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        buf = self._host.get(layer)
        if buf is None or buf.shape != x.shape or buf.dtype != x.dtype:
            if buf is not None:
                self.memory.free(buf)
            buf = self.memory.empty(x.shape, x.dtype)
            self._host[layer] = buf
            self.allocations += 1
            if self.on_new_buffer is not None:
                self.on_new_buffer(buf)
        return buf

    def host_bytes(self) -> int:
        """Bytes of the host buffers allocated so far (one per offloaded layer), exactly."""
        return sum(b.untyped_storage().nbytes() for b in self._host.values())

    def pinned_bytes(self) -> int:
        """Bytes of them page-locked: :meth:`host_bytes` when pinned, else 0."""
        return self.memory.pinned_bytes

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
    @staticmethod
    def forward(ctx, x, block, layer, offloader, options, args, kwargs):
        with torch.no_grad():
            out = block(x, *args, **kwargs)
        ctx.block, ctx.layer, ctx.offloader, ctx.options = block, layer, offloader, options
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
            if ctx.options.prefetch:
                ctx.offloader.prefetch(ctx.layer - 1)  # overlaps with this layer's recompute
        x = x.detach().requires_grad_(ctx.requires_x_grad)
        with torch.enable_grad():
            out = ctx.block(x, *ctx.args, **ctx.kwargs)
        if ctx.options.release_output:
            _release_if_unsaved(out)
        torch.autograd.backward(out, dout)
        return x.grad, None, None, None, None, None, None


@dataclass(frozen=True)
class _Options:
    prefetch: bool
    release_output: bool


def apply_offloaded_ac(
    model: nn.Module, offloader: HostOffloader, keep_layers: int, prefetch: bool = True,
    release_output: bool = True,
) -> None:
    """Checkpoint every block of ``model.layers``; offload inputs of layers ``>= keep_layers``
    through ``offloader``.

    ``prefetch``: copy the previous layer's input back during a layer's backward (see the
    module docstring).  ``release_output``: free the recomputed block output before the inner
    backward when nothing saved it (off only to measure what that saves).

    Parameter FQNs and the state dict are unchanged (no wrapper module is inserted): each
    block instance's ``forward`` is routed through the checkpoint function, so module hooks
    (FSDP's unshard/reshard) still run around it.
    """
    options = _Options(prefetch, release_output)
    for name, block in model.layers.items():
        layer = int(name)
        _wrap_forward(block, layer, offloader if layer >= keep_layers else None, options)


def _wrap_forward(block: nn.Module, layer: int, offloader: HostOffloader | None,
                  options: _Options) -> None:
    inner = block.forward

    def forward(x, *args, **kwargs):
        if not torch.is_grad_enabled():
            return inner(x, *args, **kwargs)
        return _OffloadedCheckpoint.apply(x, inner, layer, offloader, options, args, kwargs)

    block.forward = forward
