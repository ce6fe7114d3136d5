"""The planner's search: every layout the job's CP degree allows, every ``[memory]`` choice,
the ones that fit (:mod:`...titan.fitting`) and the fastest of them (:mod:`.speed`).

A *layout* is a style with its all-to-all degree ``u`` and UPipe's ``U``, checked by the
trainer's own config checks (:func:`~...titan.checks.validate_job_config`) on a copy of the
job's config: ``ulysses`` (``u = C``), ``upipe`` (``u`` any divisor of ``C``: UPipe x ring
below ``C``; each valid ``U``), ``usp`` (``u < C``; ``u = 1`` is a pure zigzag ring).
TorchTitan's built-in ``ring`` is not searched: the memory model and the estimator model our
ring (``usp`` with ``ulysses_degree = 1``), not torch's DTensor ring.

A *row* of the answer is one style and ``u``; its configuration is the fastest that fits
(``U``, and the memory options: offload with the most layers kept on the device that fit,
prefetch, refetched inputs, in-place residual gradients whenever it offloads, the tiles and
the chunked loss, the optimizer state on the host), or, when none fits, its leanest.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

from ...cp.kernels.base import FA2_OFFSET_LIMIT, fa2_backward_offset
from ...titan import fitting as fm
from ...titan import memory_model as mm
from ...titan.checks import validate_job_config
from ...titan.config import ConfigError
from ...titan.shape import ModelShape
from .speed import Hardware, Prediction, predict


@dataclass(frozen=True)
class Layout:
    style: str
    ulysses: int           # u
    chunk_heads: int = 0   # U (upipe)

    @property
    def row(self) -> str:
        """The answer's row: style and ``u`` (``U`` is chosen within it)."""
        return f"{self.style} u={self.ulysses}"

    def label(self, cp: int) -> str:
        ring = cp // self.ulysses
        parts = [self.style] + ([f"U={self.chunk_heads}"] if self.chunk_heads else [])
        parts.append(f"u={self.ulysses}" + (f" x ring {ring}" if ring > 1 else ""))
        return " ".join(parts)

    def options(self, cp=None) -> dict[str, object]:
        """train.py options of the layout; with ``cp`` (the job's ``[context_parallel]``),
        only those that differ from it (the style always)."""
        out: dict[str, object] = {
            "context_parallel.style": self.style,
            "context_parallel.ulysses_degree": 0 if self.style == "ulysses" else self.ulysses,
            "context_parallel.upipe_chunk_heads": self.chunk_heads,
        }
        if cp is not None:
            given = {"context_parallel.ulysses_degree": cp.ulysses_degree,
                     "context_parallel.upipe_chunk_heads": cp.upipe_chunk_heads}
            out = {k: v for k, v in out.items() if k not in given or given[k] != v}
        return out


@dataclass
class Candidate:
    layout: Layout
    fit: fm.Fit
    prediction: Prediction
    pinned: bool = True  # offloaded inputs in page-locked host buffers (memory.offload_pinned)

    @property
    def setup(self) -> mm.Setup:
        return self.fit.setup

    def options(self, job: Job) -> dict[str, object]:
        """train.py options of this candidate that differ from the job's."""
        opts = self.layout.options(job.job_config.context_parallel)
        if self.setup.seq_len != job.job_config.training.seq_len:
            opts["training.seq_len"] = self.setup.seq_len
        opts.update(fm.memory_changes(job.base, self.setup))
        configured = job.job_config.memory.offload_pinned
        if self.setup.offload and self.pinned != configured:
            opts["memory.offload_pinned"] = self.pinned
        elif not self.setup.offload and not configured:
            opts["memory.offload_pinned"] = True  # pageable buffers need offloading on
        return opts


@dataclass
class Job:
    """The job to plan: its parsed config, world and the hardware."""

    job_config: object
    world: int
    budget: fm.Budget
    hardware: Hardware
    model_args: object
    pinned_gib: float | None = None
    """Host memory per node that may be page-locked (``None``: all of it); offloaded inputs
    above it go to pageable buffers (``memory.offload_pinned = false``, slower copies)."""
    base: mm.Setup = field(init=False)
    layouts: list[tuple[Layout, mm.Setup]] = field(init=False)
    refused: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        if self.job_config.activation_checkpoint.mode != "full":
            raise ConfigError(
                "the planner predicts memory for full activation checkpointing (what long "
                f"contexts need); set activation_checkpoint.mode='full' (got "
                f"{self.job_config.activation_checkpoint.mode!r})")
        self.layouts, self.refused = [], {}
        for layout in _layouts(self.job_config, self.model_args):
            try:
                st = self.setup_of(layout)
            except (ConfigError, ValueError) as e:
                self.refused.setdefault(layout.row, str(e))
                continue
            self.layouts.append((layout, st))
        valid_rows = {layout.row for layout, _ in self.layouts}
        self.refused = {row: why for row, why in self.refused.items() if row not in valid_rows}
        if not self.layouts:
            raise ConfigError("no context-parallel layout of this job passes the config checks: "
                              + "; ".join(f"{k}: {v}" for k, v in self.refused.items()))
        # every layout carries the job's own [memory] options: the base the answer's
        # options are printed against
        self.base = self.layouts[0][1]

    @property
    def cp(self) -> int:
        return self.job_config.parallelism.context_parallel_degree

    @property
    def kernel(self) -> str:
        """The configured ``context_parallel.kernel``."""
        return self.job_config.context_parallel.kernel

    def config_for(self, layout: Layout):
        """A copy of the job's config with ``layout``, checked as the trainer checks it."""
        jc = copy.deepcopy(self.job_config)
        jc.context_parallel.style = layout.style
        jc.context_parallel.ulysses_degree = layout.ulysses if layout.style != "ulysses" else 0
        jc.context_parallel.upipe_chunk_heads = layout.chunk_heads
        if jc.context_parallel.kernel == "auto":
            # the GPU's pick: cuDNN on Hopper (no 32-bit offset limit), else FlashAttention-2
            jc.context_parallel.kernel = "auto" if self.hardware.gpu.hopper else "sdpa"
        return jc

    def setup_of(self, layout: Layout, seq_len: int | None = None) -> mm.Setup:
        jc = self.config_for(layout)
        if seq_len is not None:
            jc.training.seq_len = seq_len
        validate_job_config(jc, self.world, cuda=True, args=self.model_args)
        return mm.from_job_config(jc, self.world, self.model_args)

    def at(self, seq_len: int, row: str | None = None) -> list[tuple[Layout, mm.Setup]]:
        """The layouts (of ``row``, or all) valid at ``seq_len`` (divisibility depends on
        it), as setups."""
        out = []
        for layout, _ in self.layouts:
            if row is not None and layout.row != row:
                continue
            try:
                out.append((layout, self.setup_of(layout, seq_len)))
            except ConfigError:
                continue
        return out


def _layouts(job_config, model_args) -> list[Layout]:
    c = job_config.parallelism.context_parallel_degree
    model = ModelShape.from_args(model_args)
    divisors = [d for d in range(c, 0, -1) if c % d == 0]
    out = [Layout("ulysses", c)]
    for u in divisors:
        out += [Layout("upipe", u, big_u)
                for big_u in fm.chunk_heads_choices(model.n_heads, model.n_kv_heads, u)]
    out += [Layout("usp", u) for u in divisors if u < c]
    return out


def kernel_ok(st: mm.Setup, hw: Hardware, kernel: str = "auto") -> bool:
    """Whether the attention kernel can take the job's largest call: FlashAttention-2
    (``sdpa``, ``flash_attn``, and what ``kernel = "auto"`` runs off Hopper) cannot past its
    32-bit offset limit; cuDNN (``auto`` on Hopper) and ``math`` can."""
    if kernel in ("cudnn", "math") or (kernel == "auto" and hw.gpu.hopper):
        return True
    q_len, heads = st.shape.attention_call
    return fa2_backward_offset(q_len, heads, st.head_dim) < FA2_OFFSET_LIMIT


# --------------------------------------------------------------------------- per length
def options_for(layout: Layout, st: mm.Setup, job: Job) -> Candidate | None:
    """The fastest ``[memory]`` choice of ``layout`` (as ``st``) that fits, or ``None``.
    Offloaded inputs are pinned unless a node's exceed ``job.pinned_gib``."""
    if not kernel_ok(st, job.hardware, job.kernel):
        return None
    best = None
    for tiled in (False, True):
        for opt in (False, True):
            t = mm.replace(fm.with_tiles(st, tiled),
                           offload_optimizer=opt or st.offload_optimizer)
            for pre, refetch in itertools.product((True, False), (False, True)):
                f = fm.fitting_keep(mm.replace(t, offload_prefetch=pre,
                                               refetch_input=refetch or st.refetch_input),
                                    job.budget)
                if f is None:
                    continue
                pinned = (not f.setup.offload or job.pinned_gib is None
                          or f.host_node <= job.pinned_gib * fm.GiB)
                c = Candidate(layout, f, predict(f.setup, job.hardware, pinned), pinned)
                if best is None or _faster(c, best):
                    best = c
    return best


def _faster(a: Candidate, b: Candidate) -> bool:
    """By predicted step time; ties (the tiles cost nothing in the prediction) go to fewer
    options on, then the lower peak."""
    def options_on(c):
        s = c.setup
        return sum((s.offload, s.tiled_mlp, s.tiled_norm, s.chunked_loss, not s.offload_prefetch,
                    s.offload_optimizer, s.offload and s.refetch_input))

    ka = (round(a.prediction.step_s, 9), options_on(a), a.fit.peak)
    kb = (round(b.prediction.step_s, 9), options_on(b), b.fit.peak)
    return ka < kb


@dataclass
class Row:
    """One style and ``u`` at one length: its fastest fitting candidate, or its leanest."""

    row: str
    best: Candidate | None
    leanest: Candidate

    @property
    def fits(self) -> bool:
        return self.best is not None


def plan_length(job: Job, seq_len: int, row: str | None = None) -> list[Row]:
    """Every row (or ``row``) at ``seq_len``, in the order of :func:`_layouts`."""
    rows: dict[str, Row] = {}
    for layout, st in job.at(seq_len, row):
        cand = options_for(layout, st, job)
        lean_fit = fm.fit(fm.leanest(st), job.budget)
        lean = Candidate(layout, lean_fit, predict(lean_fit.setup, job.hardware))
        row = rows.get(layout.row)
        if row is None:
            rows[layout.row] = Row(layout.row, cand, lean)
            continue
        if cand is not None and (row.best is None or _faster(cand, row.best)):
            row.best = cand
        if lean.fit.peak < row.leanest.fit.peak:
            row.leanest = lean
    return list(rows.values())


def fastest(rows: list[Row]) -> Candidate | None:
    best = None
    for r in rows:
        if r.best is not None and (best is None or _faster(r.best, best)):
            best = r.best
    return best


# ---------------------------------------------------------------------------- max context
def fits_somehow(st: mm.Setup, job: Job) -> bool:
    """Whether some ``[memory]`` choice fits ``st``: the leanest device options, keeping as
    many layers on the device as the host needs (and the kernel can take the length)."""
    return (kernel_ok(st, job.hardware, job.kernel)
            and fm.fitting_keep(fm.leanest(st), job.budget) is not None)


def smallest_u(job: Job) -> dict[str, tuple[Layout, mm.Setup]]:
    """Per row, its layout of the least memory: the smallest ``U`` (one layout otherwise)."""
    out: dict[str, tuple[Layout, mm.Setup]] = {}
    for layout, st in job.layouts:
        have = out.get(layout.row)
        if have is None or layout.chunk_heads < have[0].chunk_heads:
            out[layout.row] = (layout, st)
    return out


@dataclass
class MaxContext:
    row: str
    seq_len: int
    at: Candidate | None  # the fastest configuration that fits at seq_len


def max_context(job: Job, limit: int = 1 << 28) -> list[MaxContext]:
    """Per row, the longest ``seq_len`` some configuration fits (bisected in steps of
    :func:`~...titan.fitting.seq_quantum`; the smallest ``U`` of a UPipe row is its
    leanest), and the fastest configuration at that length."""
    out = []
    for row, (layout, st) in smallest_u(job).items():
        s = fm.max_context(st, job.budget, fits=lambda x: fits_somehow(x, job),
                           limit=limit)
        best = None
        if s:
            rows = plan_length(job, s, row)
            best = rows[0].best if rows else None
        out.append(MaxContext(row, s, best))
    return out


__all__ = ["Candidate", "Job", "Layout", "MaxContext", "Row", "fastest", "fits_somehow",
           "kernel_ok", "max_context", "options_for", "plan_length", "smallest_u"]
