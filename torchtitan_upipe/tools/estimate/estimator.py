"""CPU memory estimator: one rank of an N-rank job, run under ``FakeTensorMode`` (no GPU).

    python -m torchtitan_upipe.tools.estimate --ngpu 8 --job.config_file train_configs/<name>.toml \\
        [--training.seq_len 5242880] [--benchmark.n_layers 2] [any train.py option]
        [--gpu h100 | --device-gib 80]   # judge the peak (plus --reserve-gib 4) against a device
        [--json] [--out est.json]         # print JSON instead of the summary; also write it
        [--breakdown N]   # also print the N largest groups of tensors alive at the peak
        [--rank R]        # simulate rank R (default 0; same as --benchmark.fake_rank R)

How it estimates (the same code as training, with shapes and no data):

1. The command line is ``train.py``'s, parsed by TorchTitan's ``ConfigManager``, with
   ``comm.mode = "fake_backend"`` and ``NGPU = N``: the process group is TorchTitan's fake
   backend, so this process is rank ``R`` (``--rank``, default 0) of ``N`` and collectives
   do nothing.
2. Under ``FakeTensorMode``, :class:`~torchtitan_upipe.titan.trainer.UPipeTrainer` is built as in
   training: config validation, the train spec's model, ``parallelize_llama_cp`` (the CP
   style, the ``[memory]`` stack, activation checkpointing, FSDP2 with the config's mixed
   precision), weight init and the optimizer.  Every tensor is a fake tensor: it has a shape,
   a dtype and a storage size, but no data, so 5M tokens of Llama3-8B cost nothing.
3. ``steps`` training steps run as ``Trainer.train_step`` runs them, minus logging: zero
   grads, ``forward_backward_step`` (the trainer's own input sharding, model, loss and
   backward), gradient clipping and the optimizer step.
   :class:`~torchtitan_upipe.tools.memtrack.LiveTensorTracker` keeps the running and peak sum of the bytes of live storages.  The
   first step creates the optimizer state; the reported peak is the maximum over all steps.
4. Host buffers of offloaded activations (``memory.offload_activations``) are counted apart:
   they are host memory (:class:`~torchtitan_upipe.memory.HostOffloader`), exactly their
   size, all of it page-locked on CUDA unless ``memory.offload_pinned = false``.
5. UPipe runs without its custom-op boundary (``upipe_attention(..., inline=True)``, same
   values): under fake tensors a custom op would run only its output-shape function and
   hide the stages' buffers.  A wrapper tensor (DTensor) is counted by its local tensor.
   :mod:`.fake_world` has the pieces of this fake world, each undone on exit.

``--real`` runs the same steps with real tensors on this machine (still one rank, no-op
collectives): a measurement.  On small shapes the two agree byte for byte
(``tests/tools/test_estimate.py``), which is what shows the fake run loses nothing.

What fake tensors do not see, and what is added for it:

* **Kernel workspaces.**  Memory an attention kernel allocates inside itself is invisible
  (the fake run dispatches to the CPU kernels' shape functions).  For a CUDA target
  (``--target cuda``, the default) every call of the attention backward op
  (``_scaled_dot_product_flash_attention_for_cpu_backward``, what the ``sdpa`` kernel runs
  on CPU) also counts what FlashAttention-2's backward would allocate for that call's shapes,
  :func:`torchtitan_upipe.titan.memory_model.fa2_backward_workspace_bytes`, at that moment: on top
  of the live tensors, the op's inputs and its dq, dk, dv.  So the workspace raises the peak
  only where an attention backward is the peak.
* **The caching allocator.**  Fragmentation and the rounding of blocks, the CUDA context,
  cuBLAS workspaces and NCCL buffers are not modelled: the estimate is of *allocated* bytes.
  Compare it with TorchTitan's ``memory/max_active(GiB)``; the benchmark's fit keeps an
  explicit reserve on top (``benchmarks/report.py``).
* **CPU vs CUDA operators.**  The fake run takes the CPU dispatch path; where an operator's
  CUDA path allocates differently (``aten._fused_rms_norm`` on CUDA vs the composite RMSNorm
  on CPU), the estimate follows the CPU path.  The error against GPU measurements is reported
  in ``docs/benchmarks.md`` once measured.

TorchTitan's ``style = "ring"`` runs through DTensor's SDPA dispatch, which has no CPU path;
it is refused here (``style = "usp"`` with ``ulysses_degree = 1`` is our own ring).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field

from ...cp.replay import AttentionSlot
from ...titan.config import ConfigError

GiB = 1 << 30


@dataclass
class Estimate:
    """Per-rank bytes for rank ``rank`` of an ``ngpu``-rank job (``*_bytes``) and what produced
    them."""

    ngpu: int
    seq_len: int
    n_layers: int
    style: str
    target: str
    fake: bool                   # False: measured with real tensors (``--real``)
    init_bytes: int              # live after the model is built and initialized (no grads)
    train_peak_bytes: list[int]  # per step: peak live bytes in forward + backward
    optim_peak_bytes: list[int]  # per step: peak in grad clipping + optimizer step (step 1
    #                              creates the Adam state)
    workspace_bytes: int         # the largest kernel workspace counted (see module doc)
    host_bytes: int              # host buffers of the job (exactly their size): offloaded
    #                              activations and optimizer state
    seconds: float = 0.0
    argv: list[str] = field(default_factory=list)
    rank: int = 0                # the simulated rank (ring styles are not symmetric over ranks)
    host_pinned_bytes: int = 0   # of host_bytes, page-locked on CUDA (memory.offload_pinned)
    # ``breakdown=N``: the N largest groups of storages live at the highest phase peak, as
    # (op [autograd node] @ source line, bytes, storages); the rest summed in one last row
    breakdown: list[tuple[str, int, int]] = field(default_factory=list)
    model: str = ""              # model.name/model.flavor
    device_gib: float = 0.0      # the device memory the config names (memory.device_gib, else
    #                              benchmark.device_memory_gib; 0: none)
    host_attention_bytes: int = 0  # of host_bytes, the kept attention results
    #                              (memory.keep_attention_output = "host")
    host_optimizer_bytes: int = 0  # of host_bytes, the optimizer state
    #                              (memory.offload_optimizer_state)

    @property
    def peak_bytes(self) -> int:
        """The highest peak of any phase of any step."""
        return max(max(self.train_peak_bytes), max(self.optim_peak_bytes))

    @property
    def peak_phase(self) -> str:
        """Where the peak is: ``"step k forward+backward"`` or ``"step k optimizer"``."""
        phases = [(b, f"step {i} forward+backward") for i, b in enumerate(self.train_peak_bytes, 1)]
        phases += [(b, f"step {i} optimizer") for i, b in enumerate(self.optim_peak_bytes, 1)]
        return max(phases, key=lambda p: p[0])[1]

    def to_json(self) -> dict:
        d = asdict(self)
        d["peak_bytes"] = self.peak_bytes
        d["peak_gib"] = self.peak_bytes / GiB
        d["host_gib"] = self.host_bytes / GiB
        d["host_pinned_gib"] = self.host_pinned_bytes / GiB
        d["peak_phase"] = self.peak_phase
        return d


def _tokens(n: int) -> str:
    if n >= 2**20:
        return f"{n} tokens ({n / 2**20:.2f}M)"
    return f"{n} tokens ({n / 2**10:g}K)" if n >= 2**10 else f"{n} tokens"


def summary(est: Estimate, budget=None, ranks_per_node: int = 1) -> str:
    """The estimate for people: the peak and where it is, host memory per rank and per node,
    and, given a :class:`~torchtitan_upipe.titan.fitting.Budget`, whether the peak plus the
    reserve fits the device."""
    what = "CPU estimate (fake tensors)" if est.fake else "measured on this machine (--real)"
    layers = f"{est.n_layers} layers"
    lines = [
        f"{est.model}, {layers}, {_tokens(est.seq_len)}, style "
        f"{est.style!r}: rank {est.rank} of {est.ngpu}; {what}, {len(est.train_peak_bytes)} "
        f"steps in {est.seconds:.0f} s",
        f"  peak device   {est.peak_bytes / GiB:.2f} GiB, in {est.peak_phase} (forward+backward "
        f"{max(est.train_peak_bytes) / GiB:.2f}, optimizer {max(est.optim_peak_bytes) / GiB:.2f}, "
        f"after init {est.init_bytes / GiB:.2f})",
    ]
    if est.workspace_bytes:
        lines.append(f"  of which      up to {est.workspace_bytes / GiB:.2f} GiB of FlashAttention-2 "
                     f"backward workspace (counted at each attention backward)")
    if est.host_bytes:
        pinned = "pinned" if est.host_pinned_bytes else "pageable"
        inputs = est.host_bytes - est.host_attention_bytes - est.host_optimizer_bytes
        parts = [f"{nbytes / GiB:.2f} GiB of {what}" for nbytes, what in (
            (inputs, "offloaded block inputs"), (est.host_attention_bytes, "kept attention results"),
            (est.host_optimizer_bytes, "optimizer state")) if nbytes]
        lines.append(f"  host          {est.host_bytes / GiB:.2f} GiB per rank ({pinned}), "
                     f"{ranks_per_node * est.host_bytes / GiB:.1f} GiB per node of "
                     f"{ranks_per_node} ranks: " + ", ".join(parts))
    else:
        lines.append("  host          nothing offloaded")
    if budget is None:
        lines.append("  verdict       none: give --gpu or --device-gib to judge the peak against "
                     "a device")
    else:
        need = est.peak_bytes / GiB + budget.reserve_gib
        ok = need <= budget.device_gib
        lines.append(
            f"  verdict       {'fits' if ok else 'does NOT fit'}: peak + {budget.reserve_gib:g} "
            f"GiB reserve = {need:.2f} GiB {'<=' if ok else '>'} {budget.device_gib:g} GiB per GPU"
            + ("" if ok else "; python -m torchtitan_upipe.tools.plan finds options that fit"))
    lines.append("  (allocated bytes: the allocator's fragmentation, the CUDA context and NCCL "
                 "buffers are what the reserve is for)")
    return "\n".join(lines)


def _parse(argv: list[str]):
    from ...titan.console import parse_args  # TorchTitan's, with its TOML errors as ConfigError

    return parse_args(argv)


def _check_rank(ngpu: int, rank: int) -> None:
    if not 0 <= rank < ngpu:
        raise ConfigError(f"--rank {rank} is not a rank of the {ngpu}-rank job; valid: 0 to {ngpu - 1}")


def _ensure_fake_world(ngpu: int, rank: int) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        if (dist.get_backend() != "fake" or dist.get_world_size() != ngpu
                or dist.get_rank() != rank):
            raise RuntimeError(
                f"the estimator needs a fake process group of {ngpu} ranks as rank {rank}; this "
                f"process already has a {dist.get_backend()!r} group of {dist.get_world_size()} "
                f"as rank {dist.get_rank()}"
            )


def _fake_batch(job_config, device):  # token values do not change memory
    import torch

    b, s = job_config.training.local_batch_size, job_config.training.seq_len
    tokens = torch.zeros(b, s, dtype=torch.long, device=device)
    return {"input": tokens}, torch.zeros(b, s, dtype=torch.long, device=device)


def estimate_memory(argv: list[str], ngpu: int, steps: int = 2, target: str = "cuda",
                    fake: bool = True, breakdown: int = 0, rank: int | None = None) -> Estimate:
    """Estimate the per-rank memory of ``train.py argv`` on ``ngpu`` ranks (see module doc).

    ``rank`` is the simulated rank, ``--benchmark.fake_rank`` of ``argv`` if None (default 0;
    TorchTitan's fake group would make every process rank 0).
    ``breakdown > 0`` labels every storage with the op and source line that made it and
    returns the ``breakdown`` largest groups alive at the highest peak (slower).

    ``fake=False`` runs the same steps with real tensors on this machine's device (the
    collectives are still no-ops): a measurement, used to check the fake run on small shapes.
    Initializes TorchTitan's fake process group in this process (once; later calls must use
    the same ``ngpu`` and ``rank``).
    """
    from ...titan.cpu_compat import cpu_compat

    with cpu_compat():  # before TorchTitan is first imported
        return _estimate(argv, ngpu, steps, target, fake, breakdown, rank)


def _estimate(argv, ngpu, steps, target, fake, breakdown, rank) -> Estimate:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torchtitan.distributed import utils as dist_utils

    import torchtitan_upipe.train_spec  # noqa: F401  (registers the model)

    from ...titan.styles import get_style
    from ..memtrack import LiveTensorTracker
    from .fake_world import Counted, estimating_trainer, fa2_workspace, shape_only_init

    if target not in ("cuda", "cpu"):
        raise ConfigError(f"target must be 'cuda' or 'cpu', got {target!r}")
    if ngpu < 1:
        raise ConfigError(f"--ngpu must be >= 1, got {ngpu}")
    if steps < 2:
        raise ConfigError(f"steps must be >= 2 (step 1 creates the optimizer state), got {steps}")
    if rank is not None:
        _check_rank(ngpu, rank)
        argv = [*argv, "--benchmark.fake_rank", str(rank)]
    os.environ["NGPU"] = str(ngpu)
    os.environ.setdefault("LOCAL_RANK", "0")
    job_config = _parse([*argv, "--comm.mode", "fake_backend"])
    rank = job_config.benchmark.fake_rank  # checked against NGPU by the trainer's validation
    _ensure_fake_world(ngpu, rank)
    if (not get_style(job_config.context_parallel.style).estimable
            and job_config.parallelism.context_parallel_degree > 1):
        raise ConfigError(
            "context_parallel.style = 'ring' (TorchTitan's DTensor ring attention) has no CPU path "
            "and cannot be estimated; style = 'usp' with ulysses_degree = 1 is this plugin's ring"
        )
    if job_config.debug.seed is None:  # else rank 0 would broadcast a seed read from its RNG
        job_config.debug.seed = 0
    job_config.checkpoint.enable = False
    job_config.metrics.enable_tensorboard = False

    counted = Counted(fake)
    tracker = counted.tracker = LiveTensorTracker(
        ignore=counted.ignore, attribute=breakdown > 0,
        workspace=fa2_workspace(
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default)
        if target == "cuda" else None)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if fake:
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
            stack.enter_context(shape_only_init())
        stack.enter_context(tracker)

        trainer = estimating_trainer(job_config, counted)
        init_bytes = tracker.live_bytes
        model_parts, parallel_dims = trainer.model_parts, trainer.parallel_dims
        # where training moves the batch; fake tensors tell "cpu" and "cpu:0" apart
        device = trainer.device if trainer.device.type == "cuda" else torch.device("cpu")
        train_peaks, optim_peaks = [], []
        at_peak, highest = [], -1

        def end_phase(peaks: list[int]) -> None:
            nonlocal at_peak, highest
            peaks.append(tracker.peak_bytes)
            if breakdown and tracker.peak_bytes > highest:
                highest, at_peak = tracker.peak_bytes, tracker.peak_breakdown()
            tracker.reset_peak()

        for _ in range(steps):  # Trainer.train_step without the logging
            trainer.optimizers.zero_grad()
            tracker.reset_peak()
            input_dict, labels = _fake_batch(job_config, device)
            global_valid_tokens = torch.tensor(float(labels.numel()), device=device)
            loss = trainer.forward_backward_step(
                input_dict=input_dict, labels=labels, global_valid_tokens=global_valid_tokens
            )
            del loss
            end_phase(train_peaks)
            dist_utils.clip_grad_norm_(
                [p for m in model_parts for p in m.parameters()],
                job_config.training.max_norm,
                foreach=True,
                pp_mesh=parallel_dims.get_optional_mesh("pp"),
                ep_enabled=parallel_dims.ep_enabled,
            )
            trainer.optimizers.step()
            end_phase(optim_peaks)
        offloader = trainer.plan.offloader
        host = host_attention = host_optimizer = 0
        if offloader is not None:
            host = offloader.host_bytes()
            host_attention = offloader.host_bytes(parts=AttentionSlot.PARTS)
        if trainer.optimizer_offloader is not None:
            host_optimizer = trainer.optimizer_offloader.host_bytes()
            host += host_optimizer
    shape = trainer.plan.shape  # the job the trainer built
    est = Estimate(
        ngpu=ngpu,
        seq_len=shape.seq_len,
        n_layers=shape.model.n_layers,
        style=trainer.plan.style.name,
        target=target,
        fake=fake,
        init_bytes=init_bytes,
        train_peak_bytes=train_peaks,
        optim_peak_bytes=optim_peaks,
        workspace_bytes=tracker.workspace_peak,
        host_bytes=host,
        seconds=time.perf_counter() - start,
        argv=list(argv),
        rank=rank,
        host_pinned_bytes=host if job_config.memory.offload_pinned else 0,
        breakdown=_top(at_peak, breakdown),
        model=f"{job_config.model.name}/{job_config.model.flavor}",
        device_gib=job_config.memory.device_gib or job_config.benchmark.device_memory_gib,
        host_attention_bytes=host_attention,
        host_optimizer_bytes=host_optimizer,
    )
    with contextlib.suppress(Exception):
        trainer.close()
    return est


def _top(rows: list[tuple[str, int, int]], n: int) -> list[tuple[str, int, int]]:
    if len(rows) <= n:
        return rows
    rest = rows[n:]
    return [*rows[:n], (f"({len(rest)} other groups)", sum(r[1] for r in rest),
                        sum(r[2] for r in rest))]


def format_breakdown(est: Estimate) -> str:
    """The breakdown as a markdown table, GiB per group."""
    lines = ["| GiB | storages | made by (op [autograd node] @ source) |", "|---:|---:|---|"]
    lines += [f"| {b / GiB:.3f} | {n} | `{label}` |" for label, b, n in est.breakdown]
    total = sum(b for _, b, _ in est.breakdown)
    peak = est.peak_bytes
    lines.append(f"| {total / GiB:.3f} | | total (the peak: {peak / GiB:.3f}) |")
    return "\n".join(lines)
