"""Full-depth points, fits and maximum contexts from the runs' JSON (see :mod:`.report`).

1. **Full depth.**  Runs of one setting (style, U, u, config) at one ``seq_len`` and two
   layer counts ``L1 < L2`` give affine fits
   (:func:`~torchtitan_upipe.tools.perf_model.fit.fit_two`) of the step time, evaluated at
   the flavor's depth ``L``.  Memory is not affine in the layer count (where in the backward
   the step peaks, and which gradients and optimizer state are alive there, changes with the
   depth; docs/benchmarks.md), so a measured ``L1``-layer peak is carried to full depth by
   the CPU estimator's difference ``est(L) - est(L1)`` (runs of ``kind == "estimate"``);
   without estimates it falls back to the affine fit.  A full-depth run at that length is
   used as is and measures the extrapolation's error ``(extrapolated - measured) / measured``.
2. **Maximum context** per setting: the largest length of the paper's grid
   (:data:`.paper.GRID`) whose full-depth peak plus ``reserve_gib`` (NCCL buffers and
   all-to-all staging that the fake backend does not allocate) is at most ``device_gib``,
   and whose host memory per node (the estimator's exact host bytes per rank times the ranks
   of one node, at most :data:`RANKS_PER_NODE`) is at most ``host_gib`` (the offloaded
   block inputs and optimizer state of all of a node's ranks); a length where any run went
   out of memory does not fit.
3. **Throughput.**  ``compute tps = B S / (C step)``; the modeled multi-GPU figure adds the
   communication of :mod:`torchtitan_upipe.tools.perf_model.comm`:
   ``B S / (C (step + exposed comm))``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field

from torchtitan_upipe.tools.perf_model import comm as cm
from torchtitan_upipe.tools.perf_model.fit import fit_two

from . import paper
from .settings import Setting, display_names, setting_of

DEVICE_GIB = 80.0
RESERVE_GIB = 4.0
HOST_GIB = 2048.0
"""Host memory of one 8-GPU node (a DGX H100 has 2 TiB), for the maximum-context rule."""
RANKS_PER_NODE = 8


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
            if s.style != "none" and s.cp_degree > 1:
                job = s.comm_job(pt.seq_len)
                pt.model = cm.model_step(job, pt.step_s, net, overlap=False)
                pt.model_overlap = cm.model_step(job, pt.step_s, net, overlap=overlap)
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


def host_per_node_gib(p: Point) -> float | None:
    """The estimator's host memory per rank times the ranks of one node (None: no estimate)."""
    if p.est_host_gib is None:
        return None
    return p.est_host_gib * min(p.setting.ngpu, RANKS_PER_NODE)


def max_context(points: list[Point], device_gib: float = DEVICE_GIB,
                reserve_gib: float = RESERVE_GIB, grid: tuple[int, ...] = paper.GRID,
                estimated: bool = False, host_gib: float | None = HOST_GIB) -> list[MaxContext]:
    """Per setting: the largest grid length with ``peak + reserve <= device`` and host memory
    per node ``<= host_gib`` where an estimate gives it (``None``: host not checked; see module
    doc); ``estimated``: the CPU estimator's full-depth peaks instead of the GPU's."""
    if estimated:
        points = [Point(p.setting, p.seq_len, mem_gib=p.est_gib, est_host_gib=p.est_host_gib)
                  for p in points if p.est_gib is not None]
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
                host = host_per_node_gib(p)
                fits[p.seq_len] = (p.mem_gib + reserve_gib <= device_gib
                                   and (host_gib is None or host is None or host <= host_gib))
        ok = [s for s, f in fits.items() if f]
        best = max(ok) if ok else None
        fails = sorted(s for s, f in fits.items() if not f and (best is None or s > best))
        out.append(MaxContext(setting, names[setting], best, fails[0] if fails else None,
                              setting.paper_row()))
    return out
