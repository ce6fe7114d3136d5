"""TorchTitan's metrics with the attention share of step time, counted tokens and no false MFU.

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
Three counters show that nothing is re-created step after step (:func:`reuse_metrics`):
``memory/host_buffer_allocs``, ``cp/process_groups`` and ``cp/rope_table_builds``.
It counts each token once in ``n_tokens_seen`` and shows MFU and TFLOP/s only where a peak is
known for the device (see the class).
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


def host_memory_metrics(offloader, optimizer=None) -> dict[str, float]:
    """The host buffers in GiB: the offloaded activations' (``memory/host_offload``) and the
    optimizer state's (``memory/host_optimizer``, ``memory.offload_optimizer_state``),
    allocated (exactly their size), and how much of all of them is page-locked
    (``memory/host_pinned``: all, or none with ``memory.offload_pinned = false``)."""
    metrics = {}
    if offloader is not None:
        metrics["memory/host_offload(GiB)"] = offloader.host_bytes() / 2**30
    if optimizer is not None:
        metrics["memory/host_optimizer(GiB)"] = optimizer.host_bytes() / 2**30
    owner = offloader or optimizer
    if owner is not None:  # the job's one HostMemory
        metrics["memory/host_pinned(GiB)"] = owner.memory.pinned_bytes / 2**30
    return metrics


def reuse_metrics(offloader, model_parts) -> dict[str, float]:
    """Counters that stay constant from the first step on when the run reuses what it built:
    host buffers allocated for offloaded activations, process groups created (all kinds), and
    RoPE tables built.  A counter that grows from step to step is a leak of its resource."""
    from .groups import process_group_count

    metrics = {"cp/process_groups": float(process_group_count())}
    if offloader is not None:
        metrics["memory/host_buffer_allocs"] = float(offloader.allocations)
    builds = [part.rope_table_builds for part in model_parts or []
              if hasattr(part, "rope_table_builds")]
    if builds:
        metrics["cp/rope_table_builds"] = float(sum(builds))
    return metrics


# The devices TorchTitan 0.2.2's ``get_peak_flops`` has a bf16 peak for (by name); any other
# device gets an A100's peak there, so MFU and TFLOP/s are not shown for it.
_PEAK_KNOWN = ("A100", "H100", "H200", "H20", "B200", "MI355X", "MI300X", "MI325X", "MI250X",
               "Data Center GPU Max 1550", "l40s")


def peak_known(device_type: str, device_name: str) -> bool:
    """Whether TorchTitan knows the bf16 peak FLOP/s of this device (never for a CPU)."""
    return device_type != "cpu" and any(key in device_name for key in _PEAK_KNOWN)


class CPMetricsProcessor(MetricsProcessor):
    """TorchTitan's metrics, with three differences in what is logged:

    * ``tflops`` and ``mfu(%)`` only where a peak is known for the device
      (:func:`peak_known`): TorchTitan would divide by an A100's peak on a CPU;
    * ``n_tokens_seen`` counts each token of the global batch once (``tokens_seen``, set by
      the trainer), where TorchTitan sums every data-parallel and CP rank's count, which counts
      a token C times under CP;
    * the attention time and the host buffers (module doc).

    ``tps`` is TorchTitan's: tokens of the global batch per second per GPU (the tokens of
    one data-parallel rank's batch over the CP x TP ranks that share them).
    """

    host_offloader = None
    """The trainer's :class:`~torchtitan_upipe.memory.HostOffloader` (``memory.offload_activations``),
    whose host bytes are logged next to TorchTitan's device memory."""

    optimizer_offloader = None
    """The trainer's :class:`~torchtitan_upipe.memory.OptimizerStateOffloader`
    (``memory.offload_optimizer_state``), whose host bytes are logged too."""

    tokens_seen = None
    """A callable returning the tokens trained on so far, each counted once (the trainer's)."""

    def __init__(self, job_config, parallel_dims, tag=None) -> None:
        super().__init__(job_config, parallel_dims, tag)
        from torchtitan.tools.utils import device_type

        monitor = self.device_memory_monitor
        self.show_flops = peak_known(device_type, monitor.device_name)
        if not self.show_flops and tag is None:
            from torchtitan.tools.logging import logger

            where = "a CPU" if device_type == "cpu" else monitor.device_name
            logger.info(f"MFU and TFLOP/s are not shown: TorchTitan knows no bf16 peak for {where}")

    def log(self, step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=None):
        extra = dict(extra_metrics or {})
        if self.tokens_seen is not None:
            extra["n_tokens_seen"] = self.tokens_seen()
        extra.update(host_memory_metrics(self.host_offloader, self.optimizer_offloader))
        extra.update(reuse_metrics(self.host_offloader, self.model_parts))
        time_delta = time.perf_counter() - self.time_last_log
        timers = [m.timer for part in (self.model_parts or []) for m in part.modules()
                  if getattr(m, "timer", None) is not None]
        if timers:
            seconds = sum(t.consume() for t in timers)
            extra["time_metrics/attention(s)"] = seconds
            extra["time_metrics/attention(%)"] = 100.0 * seconds / time_delta if time_delta > 0 else 0.0
        if self.show_flops:
            super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=extra)
            return
        self._log_without_flops(step, global_avg_loss, global_max_loss, grad_norm, extra,
                                time_delta)

    def _log_without_flops(self, step, global_avg_loss, global_max_loss, grad_norm, extra,
                           time_delta) -> None:
        """TorchTitan's ``MetricsProcessor.log`` without ``tflops`` and ``mfu(%)``."""
        from torchtitan.tools.logging import logger

        tps = self.ntokens_since_last_log / (time_delta * self.parallel_dims.non_data_parallel_size)
        loading = self.data_loading_times
        mem = self.device_memory_monitor.get_peak_stats()
        metrics = {
            "loss_metrics/global_avg_loss": global_avg_loss,
            "loss_metrics/global_max_loss": global_max_loss,
            "grad_norm": grad_norm,
            "throughput(tps)": tps,
            "time_metrics/end_to_end(s)": time_delta / self.job_config.metrics.log_freq,
            "time_metrics/data_loading(s)": sum(loading) / len(loading) if loading else 0.0,
            "time_metrics/data_loading(%)": 100 * sum(loading) / time_delta,
            "memory/max_active(GiB)": mem.max_active_gib,
            "memory/max_active(%)": mem.max_active_pct,
            "memory/max_reserved(GiB)": mem.max_reserved_gib,
            "memory/max_reserved(%)": mem.max_reserved_pct,
            "memory/num_alloc_retries": mem.num_alloc_retries,
            "memory/num_ooms": mem.num_ooms,
            **extra,
        }
        self.logger.log(metrics, step)
        c = self.color
        logger.info(
            f"{c.red}step: {step:2}  {c.green}loss: {global_avg_loss:8.5f}  "
            f"{c.orange}grad_norm: {grad_norm:7.4f}  "
            f"{c.turquoise}memory: {mem.max_reserved_gib:5.2f}GiB({mem.max_reserved_pct:.2f}%)  "
            f"{c.blue}tps: {round(tps):,}{c.reset}"
        )
        self.ntokens_since_last_log = 0
        self.data_loading_times.clear()
        self.time_last_log = time.perf_counter()
        self.device_memory_monitor.reset_peak_stats()


def build_cp_metrics_processor(job_config, parallel_dims, model_args=None, tag=None):
    return CPMetricsProcessor(job_config, parallel_dims, tag)
