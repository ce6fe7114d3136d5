"""Keep each layer's attention result from the forward, so that the backward's recompute does
not run the attention kernel forward again (``memory.keep_attention_output``).

Under full activation checkpointing every block runs twice: in the forward, without
autograd, and in the backward's recompute.  The attention in the recompute computes exactly
what it computed in the forward.  One :class:`AttentionSlot` per layer records that result
in the forward (:meth:`~AttentionSlot.recording`) and hands it back in the recompute
(:meth:`~AttentionSlot.replaying`).  There the attention returns it as its result and saves
it for its backward, which runs unchanged:

* **UPipe** (:func:`~torchtitan_upipe.cp.upipe.upipe_attention`) replays the whole fused op:
  the recompute runs no stage at all, so no projection, no all-to-all and no kernel.  The
  backward op gets the kept ``out (B, S/C, H*D)`` and ``lse (n_stages, B, U/C, S)``; it
  re-projects Q/K/V itself, as always.
* **Ulysses and USP** replay the kernel (:class:`ReplayKernel`; for USP the kernel is a
  ring pass).  The Q/K/V projections, RoPE and the all-to-alls still run in the recompute,
  because the kernel's backward takes the head-sharded Q, K and V.  Kept are the
  head-sharded ``out (B, S, H/C, D)`` and ``lse (B, H/C, S)``.

Where the result is kept.  Without an offloader (``"device"``) the slot holds the tensors.
With one (``"host"``) they go to the layer's host buffers next to its block input
(:class:`~torchtitan_upipe.memory.HostOffloader`, parts ``"attention_out"`` and
``"attention_lse"``), on the same side stream, and are prefetched with it (a layer whose
input stays on the device has its result on the host all the same).  The values are bit for bit those of a recompute: a kernel forward is deterministic.

A slot outside both modes (an evaluation forward, a forward outside the checkpoint) lets the
attention compute as usual and keeps nothing.
"""

from __future__ import annotations

import contextlib
import enum
from typing import Iterator

import torch

from .kernels import AttentionKernel

KEEP_CHOICES = ("none", "device", "host")
"""``memory.keep_attention_output``: keep nothing (recompute the attention), keep on the
device, keep with the offloaded block input on the host."""


class Mode(enum.Enum):
    OFF = "off"
    RECORD = "record"
    REPLAY = "replay"


class AttentionSlot:
    """One layer's kept attention result.

    ``offloader``: keep it in ``offloader``'s host buffers of ``layer`` (``None``: keep the
    tensors).  ``recorded`` and ``replayed`` count the results kept and handed back.
    """

    PARTS = ("attention_out", "attention_lse")

    def __init__(self, layer: int, offloader=None) -> None:
        self.layer, self.offloader = layer, offloader
        self.mode = Mode.OFF
        self._kept: tuple[torch.Tensor, torch.Tensor] | None = None
        self._on_host = False
        self.recorded = self.replayed = 0

    @contextlib.contextmanager
    def _in(self, mode: Mode) -> Iterator[None]:
        if self.mode is not Mode.OFF:
            raise RuntimeError(f"layer {self.layer}: attention slot already in {self.mode.value}")
        self.mode = mode
        try:
            yield
        finally:
            self.mode = Mode.OFF

    def recording(self) -> contextlib.AbstractContextManager:
        """The block's forward: the attention computes and :meth:`keep`\\ s its result."""
        return self._in(Mode.RECORD)

    def replaying(self) -> contextlib.AbstractContextManager:
        """The block's recompute: the attention :meth:`take`\\ s the kept result."""
        return self._in(Mode.REPLAY)

    def keep(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        if self.offloader is None:
            self._kept = (out, lse)
        else:
            for part, t in zip(self.PARTS, (out, lse)):
                self.offloader.offload(self.layer, t, part)
            self._on_host = True
        self.recorded += 1

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept ``(out, lse)``; the slot lets go of them (the attention's backward holds
        them until it has run)."""
        if self._on_host:
            self._on_host = False
            out, lse = (self.offloader.reload(self.layer, part) for part in self.PARTS)
        elif self._kept is not None:
            (out, lse), self._kept = self._kept, None
        else:
            raise RuntimeError(
                f"layer {self.layer}: the recompute found no kept attention output (the block's "
                f"forward ran outside the checkpoint, or its backward ran twice)")
        self.replayed += 1
        return out, lse


class ReplayKernel(AttentionKernel):
    """``inner`` with its forward result recorded into, or replayed from, ``slot``: in
    :attr:`Mode.RECORD` the forward runs and its ``(out, lse)`` are kept, in
    :attr:`Mode.REPLAY` the forward returns the kept ones without running; the backward is
    ``inner``'s.  Wrap the outermost kernel of a layer's attention call (outside a ring pass
    or a per-document loop), so that one call records one result."""

    def __init__(self, inner: AttentionKernel, slot: AttentionSlot) -> None:
        self.inner, self.slot = inner, slot
        self.name = inner.name

    def forward(self, q, k, v, *, causal, scale):
        if self.slot.mode is Mode.REPLAY:
            return self.slot.take()
        out, lse = self.inner.forward(q, k, v, causal=causal, scale=scale)
        if self.slot.mode is Mode.RECORD:
            self.slot.keep(out, lse)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, *, causal, scale):
        return self.inner.backward(dout, q, k, v, out, lse, causal=causal, scale=scale)
