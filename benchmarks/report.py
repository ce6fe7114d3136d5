"""Turn the JSON of :func:`.runner.save` into full-depth figures, maximum contexts and tables.

Input: one or more files ``{"environment", "command", "runs": [RunResult as dict]}``.  Each run
is one rank of an ``ngpu``-GPU job at ``n_layers`` layers (0 = all) and ``seq_len`` tokens.

1. **Full depth.**  Runs of one setting (style, U, u, config) at one ``seq_len`` and two
   layer counts ``L1 < L2`` give affine fits (:func:`.fit.fit_two`) of the step time,
   evaluated at the flavor's depth ``L`` (``model.flavor`` of the TOML config, looked up in
   :data:`torchtitan_upipe.models.llama3.FLAVORS`).  Memory is not affine in the layer count
   (where in the backward the step peaks, and which gradients and optimizer state are alive
   there, changes with the depth; docs/benchmarks.md), so a
   measured ``L1``-layer peak is carried to full depth by the CPU estimator's difference
   ``est(L) - est(L1)`` (runs of ``kind == "estimate"``, :mod:`torchtitan_upipe.estimate`);
   without estimates it falls back to the affine fit.  A full-depth run at that length is used
   as is and measures the extrapolation's error ``(extrapolated - measured) / measured``.
2. **Maximum context** per setting: the largest length of the paper's grid
   (:data:`PAPER_GRID`) whose full-depth peak plus ``reserve_gib`` (NCCL buffers and
   all-to-all staging that the fake backend does not allocate) is at most ``device_gib``;
   a length where any run went out of memory does not fit.
3. **Throughput.**  ``compute tps = B S / (C step)``; the modeled multi-GPU figure adds the
   communication of :mod:`.comm_model`: ``B S / (C (step + exposed comm))``.
4. **Markdown** with the producing command(s), next to the paper's Table 3.

``python -m torchtitan_upipe.benchmark.report docs/results/NAME.json [--out NAME.md]``
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from torchtitan_upipe.tools.perf_model import comm as cm
from torchtitan_upipe.tools.perf_model.fit import fit_two
from .runner import ROOT

K, M = 2**10, 2**20
PAPER_GRID = (128 * K, 256 * K, 512 * K, 1 * M, 2 * M, 3 * M, 4 * M, 5 * M, 6 * M, 8 * M)
DEVICE_GIB = 80.0
RESERVE_GIB = 4.0

PAPER_SOURCE = (
    "UPipe paper (arXiv 2602.21196v1) Table 3, Llama3-8B on 8xH100, tokens/s per GPU; copied from "
    "the authors' project page (rghadia.github.io/untied_ulysses_proj, 'latest results', "
    "19 Feb 2026) via /work/shared/reference/upipe_paper.md section 4.1"
)
_SEQ8 = (128 * K, 256 * K, 512 * K, 1 * M, 2 * M, 3 * M, 4 * M, 5 * M)
# None = "—" (already OOM at a shorter length); "OOM" = out of memory at this length
PAPER_TABLE3_LLAMA3_8B_8XH100: dict[str, dict[int, float | str | None]] = {
    row: dict(zip(_SEQ8, vals)) for row, vals in {
        "Native PyTorch": (1373.87, 845.99, 474.30, 249.85, "OOM", None, None, None),
        "Ring": (2064.90, 1387.67, 841.05, 458.51, 237.99, 159.96, "OOM", None),
        "Ulysses": (2320.47, 1503.80, 878.63, 475.33, 246.05, 162.41, "OOM", None),
        "FPDT": (1171.68, 884.75, 621.20, 382.42, 219.53, 153.48, 119.76, None),
        "UPipe": (2281.05, 1487.29, 867.17, 472.53, 246.07, 166.32, 125.56, 98.25),
    }.items()
}
PAPER_MAX_CONTEXT_LLAMA3_8B_8XH100 = {
    "Native PyTorch": 1 * M, "Ring": 3 * M, "Ulysses": 3 * M, "FPDT": 4 * M, "UPipe": 5 * M,
}
# the same section: "Qwen3-32B" (the Llama3 architecture at Qwen3-32B sizes, our flavor "32B")
# on 16xH100, where "Ulysses" is the USP hybrid 8 x 2 and UPipe is 8 x 2
PAPER_TABLE3_32B_16XH100: dict[str, dict[int, float | str | None]] = {
    row: dict(zip(_SEQ8, vals)) for row, vals in {
        "Native PyTorch": (127.03, 112.20, 91.39, "OOM", None, None, None, None),
        "Ring": (418.39, 308.88, 194.44, 110.27, 58.45, "OOM", None, None),
        "Ulysses": (545.29, 370.70, 217.04, 117.02, 59.98, "OOM", None, None),
        "FPDT": (286.40, 217.85, 151.91, 95.88, 55.41, 38.86, 27.66, None),
        "UPipe": (483.29, 339.56, 204.46, 113.26, 59.56, 40.42, 29.97, "OOM"),
    }.items()
}
# the paper's tables by (flavor, CP degree); Llama3-8B on 16xH100 is its Fig. 5 (memory only)
PAPER_TABLE3 = {("8B", 8): PAPER_TABLE3_LLAMA3_8B_8XH100, ("32B", 16): PAPER_TABLE3_32B_16XH100}
PAPER_MAX_CONTEXT: dict[tuple[str, int], dict[str, int]] = {
    ("8B", 8): PAPER_MAX_CONTEXT_LLAMA3_8B_8XH100,
    ("32B", 16): {"Native PyTorch": 512 * K, "Ring": 2 * M, "Ulysses": 2 * M, "FPDT": 4 * M,
                  "UPipe": 4 * M},
    ("8B", 16): {"Ulysses": 6 * M, "UPipe": 8 * M},
}


# --------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Setting:
    """What a run measured, resolved from its config file, spec and extra arguments."""

    config: str
    flavor: str
    full_layers: int
    style: str
    cp_degree: int
    ngpu: int
    ulysses_degree: int
    chunk_heads: int
    batch: int
    act_bytes: int
    rotate_method: str = "allgather"
    rank: int = 0
    """The simulated rank (``benchmark.fake_rank``): a causal ring's ranks differ in memory."""
    options: tuple[str, ...] = ()
    """Any other ``section.key=value`` overrides of the run (``memory.offload_prefetch``...):
    runs that differ in them are different settings, never merged into one point."""

    @property
    def label(self) -> str:
        u = self.ulysses_degree or self.cp_degree
        if self.style == "upipe":
            name = f"upipe(U={self.chunk_heads or u}" + (f",u={u})" if u != self.cp_degree else ")")
        elif self.style == "usp":
            name = f"usp(u={u})"
        else:
            name = self.style
        if self.rank:
            name += f" rank {self.rank}"
        return f"{name} [{', '.join(self.options)}]" if self.options else name

    @property
    def paper_key(self) -> tuple[str, int]:
        return self.flavor, self.cp_degree

    def paper_row(self) -> str | None:
        """The paper's row this setting reproduces, for the paper's setups
        (:data:`PAPER_MAX_CONTEXT`).  On 8 GPUs "Ulysses" and "UPipe" are all-to-all over the 8;
        on 16 they are the 8 x 2 hybrids (all-to-all inside a node, a ring of 2 across)."""
        known = PAPER_MAX_CONTEXT.get(self.paper_key)
        if known is None:
            return None
        u = self.ulysses_degree or self.cp_degree
        if self.style == "ring":
            row = "Native PyTorch"
        elif self.style == "usp" and u == 1:
            row = "Ring"
        elif self.style == "upipe":  # the paper's UPipe: U = u = 8 on 8 and on 16 GPUs
            row = "UPipe" if u == self.chunk_heads == 8 else None
        elif self.cp_degree == 8:
            row = "Ulysses" if self.style == "ulysses" else None
        else:
            row = "Ulysses" if self.style == "usp" and u == 8 else None
        return row if row in known else None

    def paper_max_context(self) -> int | None:
        row = self.paper_row()
        return PAPER_MAX_CONTEXT[self.paper_key][row] if row else None

    def job(self, seq_len: int) -> cm.Job:
        return cm.Job(self.style, seq_len, self.cp_degree, self.ngpu, self.ulysses_degree,
                      self.chunk_heads, self.batch, self.act_bytes, self.act_bytes,
                      rotate_method=self.rotate_method)


def display_names(settings) -> dict[Setting, str]:
    """Short unique names: the style label, plus model/degrees, plus the config if needed."""
    settings = sorted(set(settings), key=lambda s: (s.label, s.flavor, s.cp_degree, s.ngpu, s.config))
    names = {s: s.label for s in settings}
    for extend in (lambda s: f"{s.flavor} C={s.cp_degree} N={s.ngpu}",
                   lambda s: os.path.basename(s.config)):
        seen: dict[str, int] = defaultdict(int)
        for n in names.values():
            seen[n] += 1
        names = {s: (f"{n} [{extend(s)}]" if seen[n] > 1 else n) for s, n in names.items()}
    return names


def _overrides(extra: list[str]) -> dict[str, str]:
    """``--section.key value`` / ``--section.key=value`` pairs of train.py arguments."""
    out, i = {}, 0
    while i < len(extra):
        arg = extra[i]
        if arg.startswith("--") and "." in arg:
            if "=" in arg:
                key, val = arg[2:].split("=", 1)
            elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
                key, val = arg[2:], extra[i + 1]
                i += 1
            else:
                key, val = arg[2:], "true"
            out[key.replace("-", "_")] = val
        i += 1
    return out


def _config_path(path: str) -> str:
    return path if os.path.isabs(path) or os.path.exists(path) else os.path.join(ROOT, path)


# overrides that setting_of resolves into Setting fields (the rotate method matters to "ring"
# only; gpu_bench.sh passes it to every style), or that do not change what is measured
_RESOLVED = {"model.flavor", "context_parallel.style", "context_parallel.ulysses_degree",
             "context_parallel.upipe_chunk_heads", "parallelism.context_parallel_degree",
             "training.mixed_precision_param", "training.local_batch_size",
             "parallelism.context_parallel_rotate_method", "benchmark.fake_rank",
             "metrics.save_for_all_ranks"}


def setting_of(spec: dict) -> Setting:
    """Resolve a run's spec (as saved) against its TOML config: what the job really was."""
    from torchtitan_upipe.titan.llama3 import FLAVORS

    with open(_config_path(spec["config"]), "rb") as f:
        toml = tomllib.load(f)
    ov = _overrides(list(spec.get("extra") or []))

    def get(section: str, key: str, default):
        val = ov.get(f"{section}.{key}", toml.get(section, {}).get(key, default))
        return type(default)(val) if not isinstance(default, str) else str(val)

    flavor = get("model", "flavor", "debugmodel")
    style = spec.get("style") or get("context_parallel", "style", "none")
    u = spec.get("ulysses_degree")
    u = get("context_parallel", "ulysses_degree", 0) if u is None else u
    chunk = spec.get("chunk_heads")
    chunk = get("context_parallel", "upipe_chunk_heads", 0) if chunk is None else chunk
    cp = get("parallelism", "context_parallel_degree", 1)
    dtype = get("training", "mixed_precision_param", "bfloat16")
    options = tuple(sorted(f"{k}={v}" for k, v in ov.items() if k not in _RESOLVED))
    return Setting(
        config=spec["config"], flavor=flavor, full_layers=FLAVORS[flavor].n_layers, style=style,
        cp_degree=cp, ngpu=int(spec.get("ngpu") or cp), ulysses_degree=u,
        chunk_heads=(chunk or (u or cp)) if style == "upipe" else 0,
        batch=get("training", "local_batch_size", 1), act_bytes=4 if dtype == "float32" else 2,
        rotate_method=get("parallelism", "context_parallel_rotate_method", "allgather")
        if style == "ring" else "allgather",
        rank=int(spec.get("rank") or get("benchmark", "fake_rank", 0)),
        options=options,
    )


def model_shape(flavor: str) -> cm.ModelShape:
    from torchtitan_upipe.titan.llama3 import FLAVORS

    return cm.ModelShape.from_args(FLAVORS[flavor])


# --------------------------------------------------------------------------------- analysis
@dataclass
class Point:
    """One setting at one sequence length, at the flavor's full depth."""

    setting: Setting
    seq_len: int
    layers: dict[int, dict] = field(default_factory=dict)
    """ok runs by layer count (0 normalized to the full depth)."""
    oom: bool = False
    mem_gib: float | None = None
    mem_source: str = ""
    mem_fit_err: float | None = None
    step_s: float | None = None
    step_fit_err: float | None = None
    compute_tps: float | None = None
    model: dict | None = None
    model_overlap: dict | None = None
    estimates: dict[int, dict] = field(default_factory=dict)
    """ok CPU-estimator runs (``kind == "estimate"``) by layer count."""
    est_gib: float | None = None
    est_host_gib: float | None = None
    est_err: float | None = None
    """``(estimate - measured active) / measured active`` at full depth."""

    @property
    def label(self) -> str:
        return self.setting.label


def load(paths: list[str]) -> list[dict]:
    """The files as dicts, each with its ``path``."""
    out = []
    for p in paths:
        with open(p) as f:
            out.append(dict(json.load(f), path=p))
    return out


def _fit_full(layers: dict[int, dict], key: str, full: int) -> tuple[float | None, str, float | None]:
    """``(value at full depth, "measured" | "fit L1,L2" | "", fit error vs measured)``."""
    have = {l: r[key] for l, r in layers.items() if r.get(key) is not None}
    measured = have.get(full)
    short = sorted(l for l in have if l < full)
    fit = fit_two(short[0], have[short[0]], short[1], have[short[1]]) if len(short) >= 2 else None
    err = fit.relative_error(full, measured) if fit is not None and measured else None
    if measured is not None:
        return measured, "measured", err
    if fit is not None:
        return fit(full), f"fit L={short[0]},{short[1]}", None
    return None, "", None


def _mem_full(layers: dict[int, dict], est: dict[int, float], full: int
              ) -> tuple[float | None, str, float | None]:
    """Full-depth peak reserved memory: measured; else a measured ``L``-layer run plus what the
    CPU estimator says the other layers add, ``est(full) - est(L)``; else the affine fit.  The
    error column is that of the extrapolation a full-depth measurement replaced."""
    have = {l: r["reserved_gib"] for l, r in layers.items() if r.get("reserved_gib") is not None}
    carried = [l for l in sorted(have, reverse=True) if l < full and l in est and full in est]
    if carried:
        l = carried[0]
        value = have[l] + est[full] - est[l]
        if full in have:
            return have[full], "measured", (value - have[full]) / have[full]
        return value, f"L={l} + estimate", None
    return _fit_full(layers, "reserved_gib", full)


def analyze(data: list[dict], net: cm.Network | None = None,
            overlap: bool | tuple[str, ...] = True) -> list[Point]:
    """Full-depth points for every (setting, seq_len) in the loaded files, sorted."""
    groups: dict[tuple[Setting, int], Point] = {}
    for d in data:
        for run in d["runs"]:
            spec = run["spec"]
            s = setting_of(spec)
            pt = groups.setdefault((s, spec["seq_len"]), Point(s, spec["seq_len"]))
            depth = spec.get("n_layers") or s.full_layers
            if run.get("kind") == "estimate":
                if run.get("ok"):
                    pt.estimates[depth] = run
            elif run.get("ok"):
                pt.layers[depth] = run
            elif run.get("oom"):
                pt.oom = True
    shapes: dict[str, cm.ModelShape] = {}
    for pt in groups.values():
        s, full = pt.setting, pt.setting.full_layers
        est = {l: r["est_peak_gib"] for l, r in pt.estimates.items()}
        pt.mem_gib, pt.mem_source, pt.mem_fit_err = _mem_full(pt.layers, est, full)
        pt.est_gib = est.get(full)
        pt.est_host_gib = pt.estimates[full]["est_host_gib"] if full in pt.estimates else None
        active = pt.layers.get(full, {}).get("active_gib")
        if pt.est_gib is not None and active:
            pt.est_err = (pt.est_gib - active) / active
        pt.step_s, _, pt.step_fit_err = _fit_full(pt.layers, "step_s", full)
        if pt.step_s and pt.step_s > 0:
            pt.compute_tps = s.batch * pt.seq_len / (s.cp_degree * pt.step_s)
            if s.style in cm.STYLES and s.cp_degree > 1:
                shape = shapes.setdefault(s.flavor, model_shape(s.flavor))
                job = s.job(pt.seq_len)
                pt.model = cm.model_step(shape, job, pt.step_s, net, overlap=False)
                pt.model_overlap = cm.model_step(shape, job, pt.step_s, net, overlap=overlap)
    names = display_names(s for s, _ in groups)
    return sorted(groups.values(), key=lambda p: (names[p.setting], p.seq_len))


@dataclass(frozen=True)
class MaxContext:
    setting: Setting
    label: str
    max_len: int | None
    """Largest fitting grid length (None: none measured fits)."""
    first_fail: int | None
    """Smallest grid length above ``max_len`` measured not to fit (None: not measured)."""
    paper_row: str | None


def max_context(points: list[Point], device_gib: float = DEVICE_GIB,
                reserve_gib: float = RESERVE_GIB, grid: tuple[int, ...] = PAPER_GRID,
                estimated: bool = False) -> list[MaxContext]:
    """Per setting: the largest grid length with ``peak + reserve <= device`` (see module doc);
    ``estimated``: the CPU estimator's full-depth peaks instead of the GPU's."""
    if estimated:
        points = [Point(p.setting, p.seq_len, mem_gib=p.est_gib) for p in points
                  if p.est_gib is not None]
    else:
        points = [p for p in points if p.layers or p.oom]
    by_setting: dict[Setting, list[Point]] = defaultdict(list)
    for p in points:
        by_setting[p.setting].append(p)
    names = display_names(by_setting)
    out = []
    for setting, pts in sorted(by_setting.items(), key=lambda kv: names[kv[0]]):
        fits: dict[int, bool] = {}
        for p in pts:
            if p.seq_len not in grid:
                continue
            if p.oom:
                fits[p.seq_len] = False
            elif p.mem_gib is not None:
                fits[p.seq_len] = p.mem_gib + reserve_gib <= device_gib
        ok = [s for s, f in fits.items() if f]
        best = max(ok) if ok else None
        fails = sorted(s for s, f in fits.items() if not f and (best is None or s > best))
        out.append(MaxContext(setting, names[setting], best, fails[0] if fails else None,
                              setting.paper_row()))
    return out


# --------------------------------------------------------------------------------- markdown
def fmt_len(n: int | None) -> str:
    """131072 -> 128K, 5242880 -> 5M, 1536 -> 1.5K."""
    if n is None:
        return "-"
    for unit, name in ((M, "M"), (K, "K")):
        if n >= unit:
            v = n / unit
            return f"{v:g}{name}" if v == int(v) or v < 10 else f"{v:.1f}{name}"
    return str(n)


def _f(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:+.1f}%"


def _paper_tps(key: tuple[str, int], row: str | None, seq_len: int) -> str:
    table = PAPER_TABLE3.get(key, {}).get(row, {})
    if seq_len not in table:
        return ""
    v = table[seq_len]
    return "—" if v is None else v if isinstance(v, str) else f"{v:.2f}"


def paper_table(key: tuple[str, int] = ("8B", 8)) -> str:
    """The paper's Table 3 for ``key`` (flavor, CP degree) with its maximum contexts."""
    head = "| Method | " + " | ".join(fmt_len(s) for s in _SEQ8) + " | max context |"
    lines = [head, "|" + "---|" * (len(_SEQ8) + 2)]
    for row in PAPER_TABLE3[key]:
        cells = [_paper_tps(key, row, s) for s in _SEQ8]
        lines.append(f"| {row} | " + " | ".join(cells)
                     + f" | {fmt_len(PAPER_MAX_CONTEXT[key][row])} |")
    return "\n".join(lines)


def markdown(data: list[dict], device_gib: float = DEVICE_GIB, reserve_gib: float = RESERVE_GIB,
             net: cm.Network | None = None, overlap: bool | tuple[str, ...] = True) -> str:
    net = net or cm.Network()
    points = analyze(data, net, overlap)
    names = display_names([p.setting for p in points])
    out = ["# CP benchmark: one rank of an N-GPU job (TorchTitan fake backend)", ""]
    for d in data:
        env = d.get("environment", {})
        out += [f"- `{d['path']}` ({env.get('device', '?')}, torch {env.get('torch', '?')}):",
                "", "  ```", f"  {d.get('command', '?')}", "  ```"]
    out += [
        "",
        ("Step time and memory are one real rank with no-op collectives (compute only, no NCCL "
        "buffers; on a machine without CUDA the memory columns are the process's peak RSS).  "
        "Full depth = affine fit over the layer count unless measured.  Modeled tps "
        "adds the communication of `torchtitan_upipe/benchmark/comm_model.py` "
        f"(NVLink {net.nvlink_GBps:g} GB/s, IB "
        f"{net.ib_GBps:g} GB/s per GPU, efficiency {net.efficiency:g}, latency "
        f"{net.latency_us:g} us: assumptions, not measurements)."),
        "",
        "## Runs",
        "",
        "| setting | S | layers | status | reserved GiB | active GiB | step s | tps/GPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in data:
        for r in d["runs"]:
            if r.get("kind") == "estimate":
                continue  # the estimate section below
            sp = r["spec"]
            status = "ok" if r.get("ok") else "OOM" if r.get("oom") else (
                "timeout" if "timeout" in (r.get("error") or "").lower()[:200] else "failed")
            out.append(f"| {names[setting_of(sp)]} | {fmt_len(sp['seq_len'])} | {sp.get('n_layers') or 'all'} "
                       f"| {status} | {_f(r.get('reserved_gib'))} | {_f(r.get('active_gib'))} "
                       f"| {_f(r.get('step_s'), '.3f')} | {_f(r.get('tps'), '.1f')} |")
    out += [
        "",
        "## Full depth",
        "",
        ("| setting | S | L | peak reserved GiB | source | mem fit err | step s (compute) "
         "| time fit err | tps/GPU compute | comm s | modeled tps/GPU | modeled, ring overlapped "
         "| paper tps/GPU |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        if not p.layers and not p.oom:
            continue  # estimated only: the estimate section below
        out.append(
            f"| {names[p.setting]} | {fmt_len(p.seq_len)} | {p.setting.full_layers} "
            f"| {'OOM' if p.oom and p.mem_gib is None else _f(p.mem_gib)} | {p.mem_source} "
            f"| {_pct(p.mem_fit_err)} | {_f(p.step_s, '.3f')} | {_pct(p.step_fit_err)} "
            f"| {_f(p.compute_tps, '.1f')} | {_f(p.model and p.model['comm_s'], '.3f')} "
            f"| {_f(p.model and p.model['tps'], '.1f')} "
            f"| {_f(p.model_overlap and p.model_overlap['tps'], '.1f')} "
            f"| {_paper_tps(p.setting.paper_key, p.setting.paper_row(), p.seq_len)} |")
    out += [
        "",
        f"## Maximum context (full-depth peak + {reserve_gib:g} GiB reserve <= {device_gib:g} GiB)",
        "",
        "| setting | max context | first length that does not fit | paper row | paper max context |",
        "|---|---|---|---|---|",
    ]
    for mc in max_context(points, device_gib, reserve_gib):
        bound = "" if mc.first_fail or mc.max_len is None else ">= "
        out.append(f"| {mc.label} | {bound}{fmt_len(mc.max_len)} | {fmt_len(mc.first_fail)} "
                   f"| {mc.paper_row or '-'} | {fmt_len(mc.setting.paper_max_context())} |")
    estimated = [p for p in points if p.estimates]
    if estimated:
        out += [
            "",
            "## CPU memory estimate (fake tensors, no GPU)",
            "",
            ("`python -m torchtitan_upipe.estimate` runs the same job options under "
             "FakeTensorMode on CPU and counts live storage bytes (allocated, not reserved), "
             "with FA2's backward workspace counted at each attention backward.  Error = "
             "(estimate - measured peak active) / measured, at full depth."),
            "",
            "| setting | S | L | estimated peak GiB | host (offloaded) GiB | measured active GiB "
            "| error |",
            "|---|---|---|---|---|---|---|",
        ]
        for p in estimated:
            full = p.setting.full_layers
            active = p.layers.get(full, {}).get("active_gib")
            out.append(f"| {names[p.setting]} | {fmt_len(p.seq_len)} | {full} | {_f(p.est_gib)} "
                       f"| {_f(p.est_host_gib)} | {_f(active)} | {_pct(p.est_err)} |")
        out += [
            "",
            (f"Estimated maximum context (estimated peak + {reserve_gib:g} GiB reserve <= "
             f"{device_gib:g} GiB):"),
            "",
            "| setting | max context | first length that does not fit | paper max context |",
            "|---|---|---|---|",
        ]
        for mc in max_context(points, device_gib, reserve_gib, estimated=True):
            bound = "" if mc.first_fail or mc.max_len is None else ">= "
            out.append(f"| {mc.label} | {bound}{fmt_len(mc.max_len)} | {fmt_len(mc.first_fail)} "
                       f"| {fmt_len(mc.setting.paper_max_context())} |")
    out += [
        "",
        "## Paper, Table 3: Llama3-8B on 8xH100, tokens/s per GPU",
        "",
        (f"Source: {PAPER_SOURCE}.  Rows map to our styles as: Ulysses = `ulysses`, UPipe = "
        "`upipe` (U = C = 8), Native PyTorch = `ring` (torch's DTensor ring attention), Ring = "
        "`usp` with u = 1 (zigzag ring).  The paper ran FA3 kernels; its Native PyTorch row had "
        "no tiled MLP, ours runs every style with the same memory stack."),
        "",
        paper_table(),
        "",
    ]
    keys = {p.setting.paper_key for p in points}
    if ("32B", 16) in keys:
        out += ["## Paper, Table 3: Qwen3-32B (our flavor 32B) on 16xH100, tokens/s per GPU", "",
                ("Same source.  Ulysses = `usp` with u = 8 (the paper's USP-Hybrid 8 x 2), UPipe = "
                 "`upipe` with u = 8 (8 x 2), Ring = `usp` with u = 1, Native PyTorch = `ring`."),
                "", paper_table(("32B", 16)), ""]
    if ("8B", 16) in keys:
        out += ["## Paper, Fig. 5: Llama3-8B on 16xH100, maximum context", "",
                "USP-Hybrid 8 x 2 (`usp` with u = 8): 6M; UPipe 8 x 2: 8M.", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json", nargs="+")
    ap.add_argument("--out", help="write the markdown here (default: stdout)")
    ap.add_argument("--device-gib", type=float, default=DEVICE_GIB)
    ap.add_argument("--reserve-gib", type=float, default=RESERVE_GIB)
    ap.add_argument("--nvlink-GBps", type=float, default=cm.Network.nvlink_GBps)
    ap.add_argument("--ib-GBps", type=float, default=cm.Network.ib_GBps)
    ap.add_argument("--efficiency", type=float, default=cm.Network.efficiency)
    ap.add_argument("--latency-us", type=float, default=cm.Network.latency_us)
    args = ap.parse_args(argv)
    net = cm.Network(args.nvlink_GBps, args.ib_GBps, args.efficiency, args.latency_us)
    text = markdown(load(args.json), args.device_gib, args.reserve_gib, net)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
