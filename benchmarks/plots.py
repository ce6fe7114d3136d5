"""Plot benchmark JSON (scripts/bench_one_rank.py) as PNGs: memory and tokens/s per GPU vs length.

    python scripts/plot_benchmarks.py docs/results/llama3_8b_8xh100.json [more.json ...] \\
        --out-dir docs/results --device-gib 80 --reserve-gib 4

Writes ``PREFIX_memory.png`` (full-depth peak reserved memory per style, log2 sequence axis,
the device memory and the device memory less the reserve as horizontal lines) and
``PREFIX_throughput.png`` (tokens/s per GPU: measured compute only, solid; modeled with
communication from torchtitan_upipe/tools/perf_model/comm.py, dashed; the paper's Table 3 rows,
dotted grey, when every run is of one setup the table has: Llama3-8B on 8, 32B on 16).
Full-depth values are measured or extrapolated over the layer count
(benchmarks/analysis.py); a style without any full-depth value is drawn from
its raw runs at their largest depth, labelled ``(L=n)``.
The CPU estimator's full-depth peaks (``bench_one_rank.py --estimate``) are dashed, with x.
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from . import paper  # noqa: E402
from .analysis import DEVICE_GIB, RESERVE_GIB, Point, analyze, load  # noqa: E402
from .render import fmt_len  # noqa: E402
from .settings import display_names  # noqa: E402


def series(points: list[Point]) -> dict[str, dict[str, list]]:
    """Per setting (display name): lists ``seq``, ``mem``, ``measured`` (bool), ``tps``, ``model``."""
    names = display_names(p.setting for p in points)
    out: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for p in points:
        s = out[names[p.setting]]
        if p.mem_gib is not None or p.compute_tps is not None or p.est_gib is not None:
            s["seq"].append(p.seq_len)
            s["mem"].append(p.mem_gib)
            s["est"].append(p.est_gib)
            s["measured"].append(p.mem_source == "measured")
            s["tps"].append(p.compute_tps)
            s["model"].append(p.model["tps"] if p.model else None)
    for label in set(names.values()) - {k for k, v in out.items() if v["seq"]}:
        # no full-depth value at all: the raw runs at the largest depth measured
        pts = [p for p in points if names[p.setting] == label and p.layers]
        depth = max((max(p.layers) for p in pts), default=None)
        if depth is None:
            continue
        s = out[f"{label} (L={depth})"]
        for p in sorted(pts, key=lambda q: q.seq_len):
            run = p.layers.get(depth)
            if run:
                s["seq"].append(p.seq_len)
                s["mem"].append(run.get("reserved_gib"))
                s["est"].append(None)
                s["measured"].append(True)
                s["tps"].append(run.get("tps"))
                s["model"].append(None)
        out.pop(label, None)
    return {k: v for k, v in out.items() if v["seq"]}


def _axis(ax, lengths: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ticks = sorted(set(lengths))
    ax.set_xticks(ticks)
    ax.set_xticklabels([fmt_len(t) for t in ticks], rotation=45)
    ax.minorticks_off()
    ax.set_xlabel("sequence length (tokens)")
    ax.grid(True, alpha=0.3)


def _xy(xs, ys):
    pairs = [(x, y) for x, y in zip(xs, ys) if y is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_memory(data: dict, path: str, device_gib: float, reserve_gib: float, title: str) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    lengths = []
    for i, (label, s) in enumerate(sorted(data.items())):
        color = f"C{i}"
        x, y = _xy(s["seq"], s["mem"])
        lengths += x
        if x:
            ax.plot(x, y, "-", color=color, label=label)
        x, y = _xy(s["seq"], s["est"])
        lengths += x
        if x:
            ax.plot(x, y, "x--", color=color, label=f"{label} CPU estimate (allocated)")
        meas = [(a, b) for a, b, m in zip(s["seq"], s["mem"], s["measured"]) if m and b is not None]
        fit = [(a, b) for a, b, m in zip(s["seq"], s["mem"], s["measured"]) if not m and b is not None]
        if meas:
            ax.plot(*zip(*meas), "o", color=color)
        if fit:
            ax.plot(*zip(*fit), "o", color=color, mfc="none")
    ax.axhline(device_gib, color="k", lw=1, label=f"device {device_gib:g} GiB")
    ax.axhline(device_gib - reserve_gib, color="k", lw=1, ls=":",
               label=f"device - {reserve_gib:g} GiB reserve")
    _axis(ax, lengths)
    ax.set_ylabel("peak memory per rank (GiB): GPU reserved, estimate allocated")
    ax.set_title(f"{title}\nfilled: measured, hollow: extrapolated over layers, x: CPU estimate")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_throughput(data: dict, path: str, title: str, paper_rows: dict | None) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    lengths = []
    for i, (label, s) in enumerate(sorted(data.items())):
        color = f"C{i}"
        x, y = _xy(s["seq"], s["tps"])
        lengths += x
        ax.plot(x, y, "o-", color=color, label=f"{label} compute only")
        x, y = _xy(s["seq"], s["model"])
        if x:
            ax.plot(x, y, "s--", color=color, mfc="none", label=f"{label} modeled with comm")
    if paper_rows:
        for j, (row, vals) in enumerate(paper_rows.items()):
            x, y = _xy(*zip(*[(k, v if isinstance(v, float) else None) for k, v in vals.items()]))
            ax.plot(x, y, ":", color=str(0.3 + 0.12 * j), marker="*", label=f"paper {row}")
            lengths += x
    _axis(ax, lengths)
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s per GPU")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json", nargs="+")
    ap.add_argument("--out-dir", default=None, help="default: the first JSON's folder")
    ap.add_argument("--prefix", default=None, help="default: the first JSON's name")
    ap.add_argument("--device-gib", type=float, default=DEVICE_GIB)
    ap.add_argument("--reserve-gib", type=float, default=RESERVE_GIB)
    args = ap.parse_args(argv)
    loaded = load(args.json)
    points = analyze(loaded)
    data = series(points)
    out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.json[0]))
    prefix = args.prefix or os.path.splitext(os.path.basename(args.json[0]))[0]
    os.makedirs(out_dir, exist_ok=True)
    settings = {p.setting for p in points}
    # the paper's Table 3 rows when every setting is of one of its setups
    keys = {s.paper_key for s in settings}
    table = (paper.table3(keys.pop()) or None) if len(keys) == 1 else None
    title = ", ".join(sorted({f"{s.flavor} C={s.cp_degree} NGPU={s.ngpu}" for s in settings}))
    paths = [os.path.join(out_dir, f"{prefix}_memory.png"), os.path.join(out_dir, f"{prefix}_throughput.png")]
    plot_memory(data, paths[0], args.device_gib, args.reserve_gib, title)
    plot_throughput(data, paths[1], title, table)
    for p in paths:
        print(p)
    return paths


if __name__ == "__main__":
    main()
