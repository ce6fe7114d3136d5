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

With ``keep_attention_output`` the block's attention result is kept from the forward and
replayed in the recompute (:mod:`torchtitan_upipe.cp.replay`): on the device, or (``"host"``)
as more parts of the layer in its host buffers, copied and prefetched with its input.

With ``refetch_input`` an offloaded layer's reloaded input is freed as soon as its recompute
has run: from there on only the attention norm's backward reads it (the residual adds save
nothing; the attention and the MLP read the norms' outputs), so it is copied back from its
host buffer (still holding it) when that norm's gradient arrives.  The layer's backward then
holds one block input less, for one more host-to-device copy per layer.

With ``inplace_residual_grads`` the recompute runs the block as TorchTitan's
``TransformerBlock.forward`` does, with the residual gradients summed in place: the gradient
of ``h = x + attention(attention_norm(x))`` is ``dout + d ffn_norm``, written into ``dout``'s
storage once the MLP's backward (its last reader) is done, and ``dx = dh + d attention_norm``
into the same storage (:class:`_ResidualAdd` passes ``dout`` to its branch only,
:class:`_GradInto` adds the norm's input gradient to it).  Autograd's sums would make a new
tensor each time while ``dout`` (held by the engine that called this backward) stays alive:
through the attention's backward, where the layer peaks, the block then holds one gradient
of the block's size instead of two.  The same additions: bit for bit where each norm is one
autograd node (the tiled norm); a norm that reads its input twice (TorchTitan's composite
RMSNorm) has its two terms summed before they meet the residual's, equal within rounding.

With ``stride = k > 1`` (segment checkpointing) only every ``k``-th offloaded layer, the
head of a segment of ``k`` consecutive layers, keeps its input in host memory; the others
keep nothing.  The backward of a segment's last layer regenerates the inputs of the layers
between from the head's: it copies the head's input back and runs blocks ``head`` to
``last - 1`` forward without autograd, keeps the last layer's input on the device for its
recompute and parks the others (and, for ``refetch_input``, the last one too) in ``k - 1``
scratch host buffers that every segment shares, from which the earlier layers of the segment
then reload theirs like any offloaded layer.  Host memory for the block inputs falls from
one per offloaded layer to one per segment plus the scratch buffers, for ``k - 1`` more block
forwards per segment; the device holds no more than one layer's backward does.  A sharded
block (FSDP2's ``FSDPModule``) is gathered with its ``unshard()`` and released with
``reshard()`` around the regenerating forward, which calls the block's own forward: module
hooks do not run, so FSDP's backward prefetch order stays that of the forward.

Layers ``< keep_layers`` are checkpointed the same way but keep their input on the device
(the paper keeps layer 0).  On a machine without CUDA the "host" copy is an ordinary CPU
tensor copy, so the same code path (buffers, ordering, prefetch) runs in CPU tests.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
import weakref
import torch
from torch import nn

from ..cp.replay import KEEP_CHOICES, AttentionSlot
from .host import HostMemory


class HostOffloader:
    """Reusable host buffers, one per layer, and the side stream that fills and drains them.

    On CUDA the buffers are pinned (``pinned=True``, exactly their size) or pageable;
    ``host_memory`` replaces the allocator (the trainer's plan shares one with the optimizer
    state's offloader; the CPU memory estimator's counts host buffers apart from device
    memory).  Without CUDA they are ordinary CPU tensors.
    """

    def __init__(self, device: torch.device, pinned: bool = True,
                 host_memory: HostMemory | None = None) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.memory = host_memory or HostMemory(pinned=pinned and self.cuda)
        weakref.finalize(self, self.memory.close)
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        # keyed by (layer, part): part "input" is the block input; a layer may hold more
        # parts (memory.keep_attention_output = "host" adds its attention output and LSE)
        self._host: dict[tuple[int, str], torch.Tensor] = {}
        self._done: dict[tuple[int, str], torch.cuda.Event | None] = {}
        self._reloaded: dict[tuple[int, str], tuple[torch.Tensor, torch.cuda.Event | None]] = {}
        self.allocations = 0
        """Host buffers allocated so far: one per offloaded layer and part, then none while
        the tensors keep their shapes (a buffer is re-created only when its tensor changes)."""

    def _buffer(self, key: tuple[int, str], x: torch.Tensor) -> torch.Tensor:
        old = self._host.get(key)
        buf = self._host[key] = self.memory.like(old, x)
        if buf is not old:
            self.allocations += 1
        return buf

    def layers(self) -> list[int]:
        """The layers that have host buffers, ascending (not the scratch buffers of segment
        checkpointing, keyed by negative numbers)."""
        return sorted({layer for layer, _ in self._host if layer >= 0})

    def host_bytes(self, parts: tuple[str, ...] | None = None) -> int:
        """Bytes of the host buffers allocated so far (one per offloaded layer and part),
        exactly; of those of ``parts`` only, if given."""
        return sum(b.untyped_storage().nbytes() for (_, part), b in self._host.items()
                   if parts is None or part in parts)

    def pinned_bytes(self) -> int:
        """Bytes of them page-locked: :meth:`host_bytes` when pinned, else 0."""
        return self.memory.pinned_bytes

    def offload(self, layer: int, x: torch.Tensor, part: str = "input") -> None:
        """Start copying ``x`` into ``layer``'s host buffer for ``part``; the caller drops ``x``."""
        key = (layer, part)
        buf = self._buffer(key, x)
        self._reloaded.pop(key, None)
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                buf.copy_(x, non_blocking=True)
                x.record_stream(self.stream)
                ev = torch.cuda.Event()
                ev.record(self.stream)
            self._done[key] = ev
        else:
            buf.copy_(x)
            self._done[key] = None

    def prefetch(self, layer: int) -> None:
        """Start copying every part of ``layer`` on the host back to the device (no-op for a
        layer with none, below layer 0, and for a part already on its way)."""
        if layer < 0:  # (negative keys are scratch buffers, not layers)
            return
        for key in [k for k in self._host if k[0] == layer and k not in self._reloaded]:
            self._fetch(key)

    def _fetch(self, key: tuple[int, str]) -> None:
        buf = self._host[key]
        if self.cuda:
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(self._done[key])
                x = torch.empty(buf.shape, dtype=buf.dtype, device=self.device)
                x.copy_(buf, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.stream)
            self._reloaded[key] = (x, ev)
        else:
            self._reloaded[key] = (buf.clone(), None)

    def refill(self, layer: int, x: torch.Tensor, part: str = "input") -> None:
        """Copy ``layer``'s ``part`` from its host buffer into ``x`` (a device tensor of its
        shape) on the current stream, after the offload's copy has ended."""
        key = (layer, part)
        buf = self._host[key]
        if self.cuda:
            ev = self._done[key]
            if ev is not None:
                torch.cuda.current_stream(self.device).wait_event(ev)
            x.copy_(buf, non_blocking=True)
        else:
            x.copy_(buf)

    def reload(self, layer: int, part: str = "input") -> torch.Tensor:
        """``layer``'s ``part`` back on the device, waiting for its copy (started here, for
        this part only, unless :meth:`prefetch` did).  The host buffer keeps it until the next
        :meth:`offload`."""
        key = (layer, part)
        if key not in self._reloaded:
            if key not in self._host:
                raise KeyError(f"layer {layer} has no {part!r} on the host")
            self._fetch(key)
        x, ev = self._reloaded.pop(key)
        if ev is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(ev)
            x.record_stream(current)
        return x


def _release_if_unsaved(out: torch.Tensor) -> None:
    """Free ``out``'s storage when no autograd node can read it: its producer is an add
    (``AddBackward0`` saves no tensors) and nothing else references the tensor's storage."""
    fn = out.grad_fn
    if fn is not None and type(fn).__name__ in _UNSAVING_ADDS and out._base is None:
        out.untyped_storage().resize_(0)


class _ResidualAdd(torch.autograd.Function):
    """``x + y``; the backward passes ``dout`` to ``y`` only and leaves it in ``box`` for
    :class:`_GradInto` on ``x``'s other reader, which adds that reader's gradient to it in
    place (so the engine does not sum ``x``'s two gradients into a new tensor).  Saves nothing."""

    @staticmethod
    def forward(ctx, x, y, box):
        ctx.box = box
        return x + y

    @staticmethod
    def backward(ctx, dout):
        ctx.box.append(dout)
        return None, dout, None


class _GradInto(torch.autograd.Function):
    """A view of ``x`` for its non-residual reader; the backward adds the reader's gradient
    ``g`` into the residual's gradient in place (``box``'s, from :class:`_ResidualAdd`, whose
    readers have all run: ``g`` comes from below them) and returns it as ``x``'s gradient, or
    with ``sink`` appends it there and returns none (``x`` a leaf: no ``.grad`` is made)."""

    @staticmethod
    def forward(ctx, x, box, sink):
        ctx.box, ctx.sink = box, sink
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        base = ctx.box.pop()
        # in place only into a dense tensor of its own (autograd may hand a backward an
        # expanded one, as ``out.sum()``'s); otherwise the sum autograd would make
        total = base.add_(g) if base._base is None and base.is_contiguous() else base + g
        if ctx.sink is None:
            return total, None, None
        ctx.sink.append(total)
        return None, None, None


_UNSAVING_ADDS = ("AddBackward0", "_ResidualAddBackward")


def _forward_summing_in_place(block: nn.Module, x: torch.Tensor, sink: list, *args, **kwargs):
    """TorchTitan's ``TransformerBlock.forward`` (``h = x + attention(attention_norm(x))``,
    ``out = h + feed_forward(ffn_norm(h))``) with both residual gradients summed in place:
    ``dh`` in ``dout``'s storage, then ``dx`` in the same (appended to ``sink``)."""
    box_x, box_h = [], []
    normed = block.attention_norm(_GradInto.apply(x, box_x, sink))
    h = _ResidualAdd.apply(x, block.attention(normed, *args, **kwargs), box_x)
    del normed
    mlp = block.feed_forward(block.ffn_norm(_GradInto.apply(h, box_h, None)))
    return _ResidualAdd.apply(h, mlp, box_h)


def _check_summable(block: nn.Module, layer: int) -> None:
    missing = [n for n in ("attention_norm", "attention", "ffn_norm", "feed_forward")
               if not isinstance(getattr(block, n, None), nn.Module)]
    if missing:
        raise ValueError(
            f"inplace_residual_grads: layer {layer}'s block ({type(block).__name__}) has no "
            f"{', '.join(missing)} module(s); the in-place sums run TorchTitan's Llama3 block "
            f"structure; set memory.offload_inplace_residual_grads=false")


class _Segment:
    """Consecutive offloaded layers from ``head`` (``stride`` of them): only the head's input is kept
    on the host; the others' are regenerated from it in the backward (module docstring)."""

    def __init__(self, head: int, offloader: HostOffloader, park_last: bool):
        self.head, self.offloader, self.park_last = head, offloader, park_last
        self.blocks: dict[int, tuple[nn.Module, object]] = {}  # layer -> (module, its forward)
        self.calls: dict[int, tuple[tuple, dict]] = {}  # layer -> its forward's other arguments
        self.parked: set[int] = set()  # layers whose regenerated input waits in a scratch buffer

    @staticmethod
    def key(slot: int) -> tuple[int, str]:
        """The scratch host buffer of the segment's ``slot``-th layer (shared by all segments)."""
        return -slot, "segment"

    def input_key(self, layer: int) -> tuple[int, str]:
        """Where ``layer``'s input is on the host: the head's own buffer, or a scratch one."""
        return (layer, "input") if layer == self.head else self.key(layer - self.head)

    def reload(self, layer: int) -> torch.Tensor:
        """``layer``'s input on the device: the head's or a parked one, reloaded, or (the
        segment's last layer, the first the backward reaches) regenerated from the head's."""
        if layer == self.head or layer in self.parked:
            self.parked.discard(layer)
            return self.offloader.reload(*self.input_key(layer))
        x = self.offloader.reload(self.head)
        for j in range(self.head, layer):
            module, forward = self.blocks[j]
            args, kwargs = self.calls[j]
            with torch.no_grad(), _gathered(module):
                x = forward(x, *args, **kwargs)
            if j + 1 < layer:
                self._park(j + 1, x)
                self.parked.add(j + 1)
        if self.park_last:  # refetch_input copies it back from a host buffer
            self._park(layer, x)
        return x

    def _park(self, layer: int, x: torch.Tensor) -> None:
        slot, part = self.key(layer - self.head)
        self.offloader.offload(slot, x, part)


@contextlib.contextmanager
def _gathered(module: nn.Module):
    """A sharded module's parameters gathered (FSDP2's ``unshard()``/``reshard()``) while its
    own forward runs outside its hooks; nothing for a module that is not sharded."""
    unshard, reshard = getattr(module, "unshard", None), getattr(module, "reshard", None)
    if unshard is None or reshard is None:
        yield
        return
    unshard()
    try:
        yield
    finally:
        reshard()


def _mode(slot: AttentionSlot | None, replay: bool) -> contextlib.AbstractContextManager:
    if slot is None:
        return contextlib.nullcontext()
    return slot.replaying() if replay else slot.recording()


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, block, layer, offloader, options, slot, norm, recompute, segment,
                args, kwargs):
        with torch.no_grad(), _mode(slot, replay=False):
            out = block(x, *args, **kwargs)
        ctx.block, ctx.layer, ctx.offloader, ctx.options = block, layer, offloader, options
        ctx.recompute, ctx.segment = recompute, segment
        ctx.slot, ctx.norm = slot, norm
        ctx.args, ctx.kwargs = args, kwargs
        ctx.requires_x_grad = x.requires_grad
        if segment is not None:  # for the regenerating forwards
            segment.calls[layer] = (args, kwargs)
        if offloader is None:
            ctx.save_for_backward(x)
        elif segment is None or layer == segment.head:
            offloader.offload(layer, x)
        # else: regenerated in the backward from the segment head's input
        return out

    @staticmethod
    def backward(ctx, dout):
        key = (ctx.layer, "input")
        if ctx.offloader is None:
            (x,) = ctx.saved_tensors
        else:
            if ctx.segment is None:
                x = ctx.offloader.reload(ctx.layer)
            else:
                x, key = ctx.segment.reload(ctx.layer), ctx.segment.input_key(ctx.layer)
            if ctx.options.prefetch:
                ctx.offloader.prefetch(ctx.layer - 1)  # overlaps with this layer's recompute
        x = x.detach().requires_grad_(ctx.requires_x_grad)
        refetch = ctx.norm is not None and ctx.offloader is not None
        sink: list[torch.Tensor] = []
        with torch.enable_grad(), _mode(ctx.slot, replay=True), (
                _refetching(ctx.norm, x, ctx.offloader, key) if refetch
                else contextlib.nullcontext()):
            if ctx.recompute is None:
                out = ctx.block(x, *ctx.args, **ctx.kwargs)
            else:
                out = ctx.recompute(x, sink, *ctx.args, **ctx.kwargs)
        if ctx.options.release_output:
            _release_if_unsaved(out)
        torch.autograd.backward(out, dout)
        dx = x.grad if ctx.recompute is None else (sink[0] if sink else None)
        return (dx,) + (None,) * 10


@contextlib.contextmanager
def _refetching(norm: nn.Module, x: torch.Tensor, offloader: HostOffloader,
                key: tuple[int, str]):
    """Around a block's recompute: free ``x``'s device storage once the recompute has run and
    copy it back from its host buffer (``key``: layer and part) when the gradient of the first
    reader of ``x``, the block's attention ``norm``, arrives (its backward, the last step to
    read ``x``, runs next).
    Between the two only autograd's saved reference to ``x`` exists: the residual adds save
    nothing, the attention and the MLP read the norms' outputs.  The refill keeps ``x``'s
    version counter, so autograd's saved-tensor check sees the tensor it saved."""
    nbytes = x.untyped_storage().nbytes()

    def refill(_grad):
        x.untyped_storage().resize_(nbytes)
        with torch.autograd._unsafe_preserve_version_counter(x):
            offloader.refill(key[0], x, key[1])

    def on_output(_module, _args, out):
        if out.requires_grad:
            out.register_hook(refill)

    handle = norm.register_forward_hook(on_output)
    try:
        yield
    finally:
        handle.remove()
    x.untyped_storage().resize_(0)


@dataclass(frozen=True)
class _Options:
    prefetch: bool
    release_output: bool


def apply_offloaded_ac(
    model: nn.Module, offloader: HostOffloader, keep_layers: int, prefetch: bool = True,
    release_output: bool = True, keep_attention_output: str = "none",
    refetch_input: bool = False, inplace_residual_grads: bool = False, stride: int = 1,
) -> None:
    """Checkpoint every block of ``model.layers``; offload inputs of layers ``>= keep_layers``
    through ``offloader``.

    ``prefetch``: copy the previous layer's input back during a layer's backward (see the
    module docstring).  ``release_output``: free the recomputed block output before the inner
    backward when nothing saved it (off only to measure what that saves).
    ``refetch_input``: an offloaded layer frees its reloaded input once its recompute has
    run and copies it back from the host buffer for its ``attention_norm``'s backward, the last
    step that reads it (one block input less through the layer's backward, one more
    host-to-device copy).
    ``stride``: only every ``stride``-th offloaded layer (from ``keep_layers``) keeps its
    input on the host; the backward regenerates the others' (segment checkpointing, see the
    module docstring).  Not with ``keep_attention_output``.
    ``inplace_residual_grads``: the recompute sums the residual gradients in place (see the
    module docstring).  The recompute then runs the blocks' submodules as TorchTitan's Llama3
    ``TransformerBlock.forward`` does, whatever the block's own ``forward`` is: callers check
    that it is that one (``titan.memory_stack.apply_offloaded_checkpointing`` does).
    ``keep_attention_output`` (:data:`~torchtitan_upipe.cp.replay.KEEP_CHOICES`): give each
    block's attention (which must have a ``kept`` attribute, as the plugin's
    context-parallel attention has) an :class:`~torchtitan_upipe.cp.replay.AttentionSlot`
    that records its result in the forward and replays it in the recompute; ``"host"`` keeps
    every layer's in ``offloader``, next to the block input (also for layers
    ``< keep_layers``, whose input stays on the device: nothing of theirs waits there).

    Parameter FQNs and the state dict are unchanged (no wrapper module is inserted): each
    block instance's ``forward`` is routed through the checkpoint function, so module hooks
    (FSDP's unshard/reshard) still run around it.
    """
    if keep_attention_output not in KEEP_CHOICES:
        raise ValueError(f"keep_attention_output={keep_attention_output!r} is not one of "
                         f"{list(KEEP_CHOICES)}")
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise ValueError(f"stride={stride!r} must be an integer >= 1")
    if stride > 1 and keep_attention_output != "none":
        raise ValueError(f"stride={stride} regenerates block inputs with plain forwards; it does "
                         f"not take keep_attention_output={keep_attention_output!r}")
    options = _Options(prefetch, release_output)
    segments: dict[int, _Segment] = {}
    for name, block in model.layers.items():
        layer = int(name)
        layer_offloader = offloader if layer >= keep_layers else None
        segment = None
        if stride > 1 and layer_offloader is not None:
            head = layer - (layer - keep_layers) % stride
            segment = segments.setdefault(head, _Segment(head, offloader, refetch_input))
            segment.blocks[layer] = (block, block.forward)
        slot = None
        if keep_attention_output != "none":
            attention = getattr(block, "attention", None)
            if not hasattr(attention, "kept"):
                raise ValueError(
                    f"keep_attention_output={keep_attention_output!r}: layer {layer}'s attention "
                    f"({type(attention).__name__}) cannot replay its result; it takes the "
                    f"plugin's context-parallel attention")
            slot = AttentionSlot(layer, offloader if keep_attention_output == "host" else None)
            attention.kept = slot
        norm = None
        if refetch_input and layer_offloader is not None:
            norm = getattr(block, "attention_norm", None)
            if not isinstance(norm, nn.Module):
                raise ValueError(f"refetch_input: layer {layer}'s block ({type(block).__name__}) "
                                 f"has no attention_norm module, the reader of the input to "
                                 f"refetch it for")
        recompute = None
        if inplace_residual_grads:
            _check_summable(block, layer)
            recompute = functools.partial(_forward_summing_in_place, block)
        _wrap_forward(block, layer, layer_offloader, options, slot, norm, recompute, segment)


def _wrap_forward(block: nn.Module, layer: int, offloader: HostOffloader | None,
                  options: _Options, slot: AttentionSlot | None, norm: nn.Module | None,
                  recompute, segment: _Segment | None) -> None:
    inner = block.forward

    def forward(x, *args, **kwargs):
        if not torch.is_grad_enabled():
            return inner(x, *args, **kwargs)
        return _OffloadedCheckpoint.apply(x, inner, layer, offloader, options, slot, norm,
                                          recompute, segment, args, kwargs)

    block.forward = forward
