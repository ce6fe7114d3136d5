"""Does a job fit: device and host memory per rank from the analytic memory model.

The questions a run must answer before it touches a GPU, all from
:mod:`.memory_model` (formulas read off the code, checked against the CPU estimator):

* :func:`fit`: one configuration's predicted peak per rank against a :class:`Budget`
  (device memory less a reserve, and the host memory of a node, which holds the offloaded
  block inputs of all its ranks);
* :func:`choose_chunk_heads`: the largest UPipe ``U`` that fits the device, what
  ``[context_parallel] upipe_chunk_heads = "auto"`` resolves to at config time;
* :func:`leanest`: the least memory the ``[memory]`` options can give a job (offload every
  block input, no prefetch, refetched inputs, in-place residual gradients, ``wo`` fused into
  UPipe's op, the optimizer state on the host, the tiles and the chunked loss on) and
  :func:`max_context`: the longest ``seq_len`` that fits with given options (searched, in
  steps of :func:`seq_quantum`);
* :func:`remedies`: the ``[memory]`` changes that make a job fit that does not.

The planner (``python -m torchtitan_upipe.tools.plan``) searches the rest (styles, degrees,
the fastest of the configurations that fit) on top of these.  Every figure is predicted, per
rank, in allocated bytes; the reserve stands for what the model leaves out (the CUDA context,
NCCL buffers, the caching allocator's fragmentation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..cp.upipe.schedule import UPipeSchedule, valid_chunk_heads
from . import memory_model as mm
from .config import ConfigError

GiB = mm.GiB

DEFAULT_RESERVE_GIB = 4.0
"""Device memory kept free of the model's prediction, per rank (the benchmark report's rule)."""


@dataclass(frozen=True)
class Gpu:
    """A GPU for planning.  ``memory_gib``: the total capacity PyTorch reports (about);
    ``bf16_tflops``: dense peak; ``hbm_TBps``: memory bandwidth; ``hopper``: ``kernel = "auto"`` takes cuDNN attention (sm90),
    otherwise FlashAttention-2 and its 32-bit offset limit; ``node_host_gib``: host memory of
    the vendor's 8-GPU system (DGX), the default host budget per node."""

    name: str
    memory_gib: float
    bf16_tflops: float
    hbm_TBps: float
    hopper: bool
    node_host_gib: float


GPUS = {
    "h100": Gpu("H100 SXM 80 GB", 79.1, 989.0, 3.35, True, 2048.0),
    "h200": Gpu("H200 SXM 141 GB", 139.7, 989.0, 4.8, True, 2048.0),
    "a100": Gpu("A100 SXM 80 GB", 79.2, 312.0, 2.0, False, 1024.0),
    "b200": Gpu("B200 192 GB", 178.4, 2250.0, 8.0, False, 4096.0),
}


def get_gpu(name: str) -> Gpu:
    key = name.lower().replace("-", "").replace(" ", "")
    if key not in GPUS:
        raise ConfigError(f"unknown GPU {name!r}; valid: {sorted(GPUS)} (or give the memory "
                          f"per GPU in GiB instead)")
    return GPUS[key]


@dataclass(frozen=True)
class Budget:
    """What a rank may use.  ``device_gib``: device memory per rank, of which ``reserve_gib``
    stays free; ``host_gib``: host memory per node (``None``: not checked), of which
    ``host_reserve_gib`` stays free for everything but the offloaded inputs (the processes,
    the data loader, the OS); ``ranks_per_node``: ranks sharing one node's host memory."""

    device_gib: float
    reserve_gib: float = DEFAULT_RESERVE_GIB
    host_gib: float | None = None
    host_reserve_gib: float = 0.0
    ranks_per_node: int = 1

    def __post_init__(self) -> None:
        if not self.device_gib > 0:
            raise ConfigError(f"device memory per GPU must be > 0 GiB, got {self.device_gib}")
        if not 0 <= self.reserve_gib < self.device_gib:
            raise ConfigError(f"the device reserve must be >= 0 and below the device memory "
                              f"({self.device_gib:g} GiB), got {self.reserve_gib}")
        if self.host_gib is not None and not 0 <= self.host_reserve_gib < self.host_gib:
            raise ConfigError(f"the host reserve must be >= 0 and below the host memory per "
                              f"node ({self.host_gib:g} GiB), got {self.host_reserve_gib}")
        if self.ranks_per_node < 1:
            raise ConfigError(f"ranks per node must be >= 1, got {self.ranks_per_node}")

    @property
    def device_limit(self) -> float:
        """Bytes a rank's predicted peak may reach."""
        return (self.device_gib - self.reserve_gib) * GiB

    @property
    def host_limit(self) -> float | None:
        """Bytes of offloaded inputs one node may hold (``None``: unlimited)."""
        return None if self.host_gib is None else (self.host_gib - self.host_reserve_gib) * GiB


@dataclass(frozen=True)
class Fit:
    """One configuration against a budget (bytes per rank, host also per node)."""

    setup: mm.Setup
    budget: Budget
    peak: int
    host_rank: int
    where: tuple[int | None, str]

    @property
    def host_node(self) -> int:
        return self.host_rank * self.budget.ranks_per_node

    @property
    def device_ok(self) -> bool:
        return self.peak <= self.budget.device_limit

    @property
    def host_ok(self) -> bool:
        limit = self.budget.host_limit
        return limit is None or self.host_node <= limit

    @property
    def ok(self) -> bool:
        return self.device_ok and self.host_ok

    def verdict(self) -> str:
        """``fits`` or ``does not fit``, with :meth:`numbers`."""
        return f"{'fits' if self.ok else 'does not fit'}: {self.numbers()}"

    def numbers(self) -> str:
        """Device and host memory against the budget."""
        b = self.budget
        dev = (f"device {gib(self.peak)} GiB + {b.reserve_gib:g} reserve "
               f"{'<=' if self.device_ok else '>'} {b.device_gib:g}")
        if b.host_gib is None:
            host = f"host {gib(self.host_rank)} GiB per rank"
        else:
            host = (f"host {gib(self.host_node)} GiB per node + {b.host_reserve_gib:g} "
                    f"reserve {'<=' if self.host_ok else '>'} {b.host_gib:g}")
        return f"{dev}; {host}"


def gib(nbytes: float) -> str:
    """Bytes as GiB for messages: one decimal from 10 GiB, else three significant digits."""
    x = nbytes / GiB
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def fit(st: mm.Setup, budget: Budget) -> Fit:
    d = mm.breakdown(st)
    return Fit(st, budget, d["peak_device"], d["host"], mm.peak_location(st))


# ------------------------------------------------------------------------------- UPipe U
def chunk_heads_choices(n_heads: int, n_kv_heads: int, degree: int) -> list[int]:
    """The valid ``U`` over an all-to-all of ``degree`` ranks, largest first (those
    :class:`~..cp.upipe.schedule.UPipeSchedule` accepts: GQA constraints included)."""
    out = []
    for u_heads in valid_chunk_heads(n_heads, degree):
        try:
            UPipeSchedule(n_heads, n_kv_heads, degree, u_heads)
        except ValueError:
            continue
        out.append(u_heads)
    return sorted(out, reverse=True)


@dataclass(frozen=True)
class ChunkHeadsChoice:
    """What ``upipe_chunk_heads = "auto"`` chose and why: every ``U`` tried, largest first,
    the chosen last (``None``: nothing fits)."""

    chunk_heads: int | None
    tried: list[tuple[int, Fit]]
    choices: list[int]

    def reason(self) -> str:
        if self.chunk_heads is None:
            return "no U fits"
        chosen = self.tried[-1][1]
        why = (f"U={self.chunk_heads}, the largest of the valid {self.choices} whose predicted "
               f"peak fits ({chosen.numbers()})")
        if len(self.tried) > 1:
            bigger = self.tried[-2]
            why += f"; U={bigger[0]} would need {gib(bigger[1].peak)} GiB"
        return why


def choose_chunk_heads(st: mm.Setup, budget: Budget,
                       allowed=lambda chunk_heads: True) -> ChunkHeadsChoice:
    """The largest valid (and ``allowed``) ``U`` whose predicted device peak fits (fewer,
    larger stages run faster; host memory does not depend on ``U``)."""
    m = st.shape.model
    choices = [u for u in chunk_heads_choices(m.n_heads, m.n_kv_heads, st.u) if allowed(u)]
    tried = []
    for u_heads in choices:
        f = fit(mm.replace(st, chunk_heads=u_heads), budget)
        tried.append((u_heads, f))
        if f.device_ok:
            return ChunkHeadsChoice(u_heads, tried, choices)
    return ChunkHeadsChoice(None, tried, choices)


# ----------------------------------------------------------------------- memory options
MEMORY_FIELDS = {
    "offload": "memory.offload_activations",
    "keep_layers": "memory.offload_keep_layers",
    "offload_stride": "memory.offload_stride",
    "offload_prefetch": "memory.offload_prefetch",
    "refetch_input": "memory.offload_refetch_input",
    "inplace_grads": "memory.offload_inplace_residual_grads",
    "fused_wo": "memory.fuse_output_projection",
    "tiled_mlp": "memory.tiled_mlp",
    "tiled_norm": "memory.tiled_norm",
    "chunked_loss": "memory.chunked_loss",
    "offload_optimizer": "memory.offload_optimizer_state",
}
"""The :class:`~.memory_model.Setup` fields the search changes, and their options."""


_OFFLOAD_FIELDS = ("keep_layers", "offload_stride", "offload_prefetch", "refetch_input",
                   "inplace_grads")

STRIDES = (2, 3, 4)
"""The ``offload_stride`` values the searches try when the host is what does not fit (each
``k`` costs ``k - 1`` more block forwards per segment of ``k`` layers)."""


def memory_changes(base: mm.Setup, st: mm.Setup) -> dict[str, object]:
    """The options ``st`` sets differently from ``base`` (the offload options only where
    offloading), as ``{option: value}``."""
    out = {}
    for field, option in MEMORY_FIELDS.items():
        old, new = getattr(base, field), getattr(st, field)
        if field in _OFFLOAD_FIELDS and not st.offload:
            continue
        if field in _OFFLOAD_FIELDS and not base.offload:
            old = None  # every offload option is new when offloading is
        if old != new:
            out[option] = new
    return out


def option_args(options: dict[str, object]) -> list[str]:
    """``{option: value}`` as train.py arguments (TorchTitan's flags for booleans:
    ``--memory.offload_activations``, ``--memory.no_offload_prefetch``)."""
    out = []
    for k, v in options.items():
        if isinstance(v, bool):
            section, _, name = k.rpartition(".")
            out.append(f"--{k}" if v else f"--{section}.no_{name}")
        else:
            out += [f"--{k}", str(v)]
    return out


def format_options(options: dict[str, object]) -> str:
    """:func:`option_args` as one string."""
    return " ".join(option_args(options))


def with_tiles(st: mm.Setup, on: bool) -> mm.Setup:
    """``st`` with the tiled MLP, the tiled norm and the chunked loss on (``on``), or as
    configured."""
    return mm.replace(st, tiled_mlp=on or st.tiled_mlp, tiled_norm=on or st.tiled_norm,
                      chunked_loss=on or st.chunked_loss)


def with_free_options(st: mm.Setup) -> mm.Setup:
    """``st`` with the options that cost nothing turned on where they apply: the residual
    gradients summed in place when offloading, ``wo`` fused into UPipe's op (no copy, no
    extra compute, exact within rounding)."""
    return mm.replace(st, inplace_grads=st.inplace_grads or st.offload,
                      fused_wo=st.fused_wo or st.shape.schedule is not None)


def memory_variants(st: mm.Setup, tiles=(False, True), prefetch=(True, False),
                    optimizer=(False, True), refetch_input=(False, True), strides=(1, 2)):
    """``st`` under every ``[memory]`` choice the search makes: the tiles and the chunked loss
    off or on together (as configured when off), the optimizer state on the device (as
    configured) or on the host, and no offload or offload with each ``keep_layers`` from
    ``L - 1`` down to 0, each ``offload_stride`` of ``strides`` that divides the offloaded
    layers, with and without prefetch, and with the inputs refetched or not (as
    configured); each with the free options on (:func:`with_free_options`)."""
    for tiled in tiles:
        for opt in optimizer:
            t = mm.replace(with_tiles(st, tiled), offload_optimizer=opt or st.offload_optimizer)
            yield with_free_options(mm.replace(t, offload=False))
            for keep in range(t.n_layers - 1, -1, -1):
                for k in (k for k in strides if (t.n_layers - keep) % k == 0):
                    for pre in prefetch:
                        for refetch in refetch_input:
                            yield with_free_options(mm.replace(
                                t, offload=True, keep_layers=keep, offload_stride=k,
                                offload_prefetch=pre, refetch_input=refetch or st.refetch_input))


def leanest(st: mm.Setup) -> mm.Setup:
    """``st`` with the least device memory the ``[memory]`` options give: every block input
    offloaded (keep 0), no prefetch, the inputs refetched for the attention norm, tiled MLP
    and norm, chunked loss, the optimizer state on the host, and the free options
    (:func:`with_free_options`)."""
    return with_free_options(mm.replace(
        st, offload=True, keep_layers=0, offload_prefetch=False, tiled_mlp=True,
        tiled_norm=True, chunked_loss=True, offload_optimizer=True, refetch_input=True))


def fitting_keep(st: mm.Setup, budget: Budget) -> Fit | None:
    """With ``st``'s other options and offloading: the largest ``keep_layers`` (the fewest
    copies) that fits device and host, or no offload when that fits; ``None`` if none fits.
    Device memory grows with ``keep_layers`` and host memory shrinks, so the largest
    ``keep_layers`` that fits the device is bisected, and the host decides there.
    When the host does not hold that, segment checkpointing: the smallest
    ``offload_stride`` of :data:`STRIDES` (the least recompute) and the largest
    ``keep_layers`` it divides the rest of that host memory fits.  Each with the free
    options on (:func:`with_free_options`)."""
    f = fit(with_free_options(mm.replace(st, offload=False)), budget)
    if f.ok:
        return f

    def at(keep, stride=1):
        return fit(with_free_options(mm.replace(st, offload=True, keep_layers=keep,
                                                offload_stride=stride)), budget)

    lo = at(0)
    if not lo.device_ok:
        return None
    lo_keep, hi_keep = 0, st.n_layers  # fits at lo_keep; keep = L (no offload) does not
    while hi_keep - lo_keep > 1:
        mid = (lo_keep + hi_keep) // 2
        f = at(mid)
        if f.device_ok:
            lo_keep, lo = mid, f
        else:
            hi_keep = mid
    if lo.host_ok:
        return lo
    for k in STRIDES:  # the device fits at every keep <= lo_keep: the host decides
        for keep in range(lo_keep, -1, -1):
            if (st.n_layers - keep) % k == 0 and (f := at(keep, k)).ok:
                return f
    return None


def remedies(st: mm.Setup, budget: Budget, limit: int = 3) -> list[tuple[dict, Fit]]:
    """``[memory]`` changes that make ``st`` fit, fewest changes first (then the most layers
    kept on the device), at most ``limit``."""
    found = []
    for v in memory_variants(st):
        f = fit(v, budget)
        if f.ok:
            changes = memory_changes(st, v)
            found.append((len(changes), -v.keep_layers if v.offload else -v.n_layers,
                          format_options(changes), changes, f))
    found.sort(key=lambda r: r[:3])
    out, seen = [], set()
    for _, _, text, changes, f in found:
        if text not in seen:
            seen.add(text)
            out.append((changes, f))
        if len(out) == limit:
            break
    return out


# ----------------------------------------------------------------------- context length
def seq_quantum(st: mm.Setup) -> int:
    """The step of the length search: a multiple of what the layout needs (``C``, or ``2C``
    with a ring dimension) and of 1024 tokens."""
    need = 2 * st.cp if st.ring > 1 else st.cp
    return need * 1024 // math.gcd(need, 1024)


def max_context(st: mm.Setup, budget: Budget, fits=None, limit: int = 1 << 31) -> int:
    """The longest ``seq_len`` (a multiple of :func:`seq_quantum`) with ``fits(setup)``
    true; default: ``st``'s options fit device and host.  0 if not even one quantum fits.
    Memory grows with the length, so the search bisects."""
    fits = fits or (lambda s: fit(s, budget).ok)
    q = seq_quantum(st)
    lo, hi = 0, 1
    while hi * q <= limit and fits(mm.replace(st, seq_len=hi * q)):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mm.replace(st, seq_len=mid * q)):
            lo = mid
        else:
            hi = mid
    return lo * q


# ------------------------------------------------------------------------- config time
def budget_from_job_config(job_config, cuda: bool) -> Budget:
    """The device budget ``upipe_chunk_heads = "auto"`` fits in: ``memory.device_gib``, else
    this CUDA device's memory (capped by ``benchmark.device_memory_gib``), less
    ``memory.reserve_gib``."""
    mem, cap = job_config.memory, job_config.benchmark.device_memory_gib
    if mem.device_gib:
        device_gib = mem.device_gib
    elif cuda:
        import os

        import torch

        total = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0")))
        device_gib = total.total_memory / GiB
        device_gib = min(device_gib, cap) if cap else device_gib
    else:
        raise ConfigError(
            "context_parallel.upipe_chunk_heads='auto' fits U to the device's memory, and "
            "there is no CUDA device to read it from: set memory.device_gib (GiB per rank)")
    if not mem.reserve_gib < device_gib:
        raise ConfigError(f"memory.reserve_gib={mem.reserve_gib:g} leaves nothing of the "
                          f"{device_gib:g} GiB device; valid: 0 <= reserve_gib < {device_gib:g}")
    return Budget(device_gib, mem.reserve_gib)


def resolve_auto_chunk_heads(job_config, world: int, model_args, cuda: bool,
                             allowed=lambda chunk_heads: True) -> ChunkHeadsChoice:
    """Resolve ``upipe_chunk_heads = "auto"`` in place: the largest valid ``U`` (of those
    ``allowed``: the style's own checks) that fits (:func:`choose_chunk_heads`).  Raise
    :class:`ConfigError` with the longest context that would fit and the ``[memory]`` changes
    that make this one fit when no ``U`` does."""
    cp = job_config.context_parallel
    if cp.style != "upipe":
        raise ConfigError(
            f"context_parallel.upipe_chunk_heads='auto' chooses UPipe's U, but "
            f"context_parallel.style={cp.style!r}; set style='upipe' or upipe_chunk_heads=0")
    ac = job_config.activation_checkpoint.mode
    if ac != "full":
        raise ConfigError(
            f"context_parallel.upipe_chunk_heads='auto' predicts memory for full activation "
            f"checkpointing (what long contexts need); set activation_checkpoint.mode='full' "
            f"(got {ac!r}) or choose U yourself")
    budget = budget_from_job_config(job_config, cuda)
    try:  # from U = u; each U is tried below
        st = mm.from_job_config(job_config, world, model_args, chunk_heads=0,
                                cuda_workspaces=cuda, fused_rms_norm=cuda)
        choice = choose_chunk_heads(st, budget, allowed)
    except ValueError as e:  # heads that cannot be split: the style's check words it
        raise ConfigError(str(e)) from None
    if choice.chunk_heads is None:
        raise ConfigError(no_fit_message(choice, budget))
    cp.upipe_chunk_heads = choice.chunk_heads
    return choice


def no_fit_message(choice: ChunkHeadsChoice, budget: Budget) -> str:
    """Why no ``U`` fits, the longest context that would, and the options that would make
    this one fit."""
    if not choice.tried:
        return ("context_parallel.upipe_chunk_heads='auto': no valid U passes the style's "
                "checks for this job; set upipe_chunk_heads to see why")
    smallest, f = choice.tried[-1]
    st = f.setup
    longest = max_context(st, budget, fits=lambda s: fit(s, budget).device_ok)
    fixes = remedies(st, budget)
    text = (f"context_parallel.upipe_chunk_heads='auto': no U fits training.seq_len="
            f"{st.seq_len} on this device: the smallest, U={smallest}, {f.verdict()} "
            f"(peak at {where_text(f.where)}). With these options the longest context that fits is "
            f"training.seq_len={longest}")
    if fixes:
        text += "; these [memory] options make this one fit: " + " | ".join(
            f"{format_options(c)} ({gib(g.peak)} GiB)" for c, g in fixes)
    else:
        lean = leanest(st)
        text += (f"; no [memory] options make it fit (the leanest: "
                 f"{format_options(memory_changes(st, lean))}, longest "
                 f"{max_context(lean, budget, fits=lambda s: fit(s, budget).device_ok)})")
    return text


def where_text(where: tuple[int | None, str]) -> str:
    """A :attr:`Fit.where` as words: ``loss`` or ``layer 3 attention_bwd``."""
    layer, phase = where
    return phase if layer is None else f"layer {layer} {phase}"


__all__ = [
    "DEFAULT_RESERVE_GIB", "GPUS", "STRIDES", "Budget", "ChunkHeadsChoice", "Fit", "Gpu",
    "budget_from_job_config", "choose_chunk_heads", "chunk_heads_choices", "fit",
    "fitting_keep", "format_options", "get_gpu", "gib", "leanest", "max_context",
    "memory_changes", "memory_variants", "option_args", "remedies", "resolve_auto_chunk_heads",
    "seq_quantum", "where_text", "with_free_options", "with_tiles",
]
