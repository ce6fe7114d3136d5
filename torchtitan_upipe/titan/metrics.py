"""The attention share of step time, as a TensorBoard scalar next to TorchTitan's metrics.

:class:`AttentionTimer` brackets everything a :class:`~.models.attention.ContextParallelAttention`
does before ``wo`` (projections, RoPE, all-to-alls, ring passes, the kernel), in the forward,
in the activation-checkpointing recompute and in the backward.  On CUDA it records events on
the current stream and reads them only when metrics are logged, so the training step never
waits for the host; on CPU it reads ``time.perf_counter``.  The backward is bracketed by two
identity autograd nodes: one on the attention output (its backward runs when the gradient
reaches the attention) and one on its input (its backward runs once the attention's backward
is done).

:class:`CPMetricsProcessor` is TorchTitan's ``MetricsProcessor`` plus two scalars,
``time_metrics/attention(s)`` and ``time_metrics/attention(%)`` (share of the wall time since
the last log), summed over every attention layer of this rank, and, with offloaded
activations, their host buffers: ``memory/host_offload(GiB)`` and ``memory/host_pinned(GiB)``.
"""

from __future__ import annotations

import time

import torch
from torchtitan.components.metrics import MetricsProcessor


class AttentionTimer:
    def __init__(self) -> None:
        self._open: list = []
        self._pairs: list = []
        self._seconds = 0.0

    def _now(self, device: torch.device):
        if device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def start(self, device: torch.device) -> None:
        self._open.append(self._now(device))

    def stop(self, device: torch.device) -> None:
        if self._open:  # unmatched marks (e.g. a forward without backward) are dropped
            self._pairs.append((self._open.pop(), self._now(device)))

    def consume(self) -> float:
        """Seconds bracketed since the last call (synchronizes with CUDA events once)."""
        total, self._seconds = self._seconds, 0.0
        for a, b in self._pairs:
            total += a.elapsed_time(b) / 1e3 if isinstance(a, torch.cuda.Event) else b - a
        self._pairs.clear()
        self._open.clear()
        return total


class _Mark(torch.autograd.Function):
    """Identity whose backward starts or stops the timer."""

    @staticmethod
    def forward(ctx, x, timer: AttentionTimer, start: bool):
        ctx.timer, ctx.start = timer, start
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (ctx.timer.start if ctx.start else ctx.timer.stop)(grad.device)
        return grad, None, None


def timed(timer: AttentionTimer | None, fn, x: torch.Tensor, *args) -> torch.Tensor:
    """``fn(x, *args)`` with its forward and backward time added to ``timer``."""
    if timer is None:
        return fn(x, *args)
    if torch.is_grad_enabled() and x.requires_grad:
        x = _Mark.apply(x, timer, False)  # backward: the attention's backward has finished
    timer.start(x.device)
    out = fn(x, *args)
    timer.stop(x.device)
    if torch.is_grad_enabled() and out.requires_grad:
        out = _Mark.apply(out, timer, True)  # backward: the attention's backward begins
    return out


def host_memory_metrics(offloader) -> dict[str, float]:
    """The offloaded activations' host buffers in GiB: allocated (exactly their size) and how
    much of it is page-locked (all of it, or none with ``memory.offload_pinned = false``)."""
    if offloader is None:
        return {}
    return {"memory/host_offload(GiB)": offloader.host_bytes() / 2**30,
            "memory/host_pinned(GiB)": offloader.pinned_bytes() / 2**30}


class CPMetricsProcessor(MetricsProcessor):
    host_offloader = None
    """The trainer's :class:`~torchtitan_upipe.memory.HostOffloader` (``memory.offload_activations``),
    whose host bytes are logged next to TorchTitan's device memory."""

    def log(self, step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=None):
        timers = [
            m.timer
            for part in (self.model_parts or [])
            for m in part.modules()
            if getattr(m, "timer", None) is not None
        ]
        host = host_memory_metrics(self.host_offloader)
        if host:
            extra_metrics = {**(extra_metrics or {}), **host}
        if timers:
            seconds = sum(t.consume() for t in timers)
            wall = time.perf_counter() - self.time_last_log
            extra_metrics = dict(extra_metrics or {})
            extra_metrics["time_metrics/attention(s)"] = seconds
            extra_metrics["time_metrics/attention(%)"] = 100.0 * seconds / wall if wall > 0 else 0.0
        super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=extra_metrics)


def build_cp_metrics_processor(job_config, parallel_dims, model_args=None, tag=None):
    return CPMetricsProcessor(job_config, parallel_dims, tag)
