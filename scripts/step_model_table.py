"""Modeled tokens/s per GPU and MFU next to the paper's Table 3, with and without
``memory.keep_attention_output`` (torchtitan_upipe.tools.perf_model.step).  Not measured.

    python scripts/step_model_table.py [--gpu h100] [--png docs/results/step_model.png]

For each paper setup (Llama3-8B on 8xH100, the 32B flavor on 16xH100) and each of its rows we
reproduce (Ulysses, UPipe U = 8, the paper's Ring as our zigzag ring), at every length of the
paper's grid up to what fits: the memory configuration the table runs is the first that fits
(peak + 4 GiB under the GPU's memory, host within the vendor node's) of the memory stack
with prefetch, without prefetch, and with every input offloaded (keep 0, no prefetch);
"none" and "host" each take their own.  The last rows give the model's error against the
paper where the paper measured the same configuration, and the calibration the paper's
figures would give (:func:`~torchtitan_upipe.tools.perf_model.step.calibrate`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import paper  # noqa: E402
from torchtitan_upipe.titan import fitting as fm  # noqa: E402
from torchtitan_upipe.titan import memory_model as mm  # noqa: E402
from torchtitan_upipe.tools.perf_model import step  # noqa: E402

ROWS = {  # paper setup -> paper row -> (style, ulysses degree, U)
    ("8B", 8): {"Ulysses": ("ulysses", 0, 0), "UPipe": ("upipe", 0, 8), "Ring": ("usp", 1, 0)},
    ("32B", 16): {"Ulysses": ("usp", 8, 0), "UPipe": ("upipe", 8, 8), "Ring": ("usp", 1, 0)},
}


def _label(seq: int) -> str:
    return f"{seq // 1024}K" if seq < 1 << 20 else f"{seq / (1 << 20):g}M"


def fitting_setup(st: mm.Setup, budget: fm.Budget) -> tuple[mm.Setup, str] | None:
    """The first memory configuration of ``st`` that fits ``budget`` (see the module doc)."""
    for name, variant in (("stack", st),
                          ("no prefetch", mm.replace(st, offload_prefetch=False)),
                          ("keep 0, no prefetch", mm.replace(st, keep_layers=0,
                                                             offload_prefetch=False))):
        if fm.fit(variant, budget).ok:
            return variant, name
    return None


def rows(gpu: str) -> list[dict]:
    rates, g = step.RATES[gpu], fm.GPUS[gpu]
    out = []
    for (flavor, cp), styles in ROWS.items():
        budget = fm.Budget(g.memory_gib, host_gib=g.node_host_gib, ranks_per_node=8)
        measured = paper.table3((flavor, cp))
        for row, (style, u, big_u) in styles.items():
            for seq in paper.GRID:
                base = mm.stack(mm.from_flavor(flavor, seq_len=seq, cp=cp, world=cp,
                                               style=style, ulysses=u, chunk_heads=big_u))
                cell = {"setup": f"{flavor} on {cp}", "row": row, "seq": seq,
                        "paper": measured.get(row, {}).get(seq)}
                for keep in ("none", "host"):
                    found = fitting_setup(mm.replace(base, keep_attention=keep), budget)
                    if found is None:
                        cell[keep] = None
                        continue
                    st, how = found
                    t = step.step_time(st, rates)
                    cell[keep] = {"tps": t.tps, "mfu": t.mfu, "how": how,
                                  "host_node_gib": 8 * mm.breakdown(st)["host"] / mm.GiB}
                if cell["none"] is None and cell["host"] is None:
                    break  # longer ones do not fit either
                out.append(cell)
    return out


def _cell(c) -> str:
    if c is None:
        return "does not fit"
    how = "" if c["how"] == "stack" else f" ({c['how']})"
    return f"{c['tps']:.0f} / {100 * c['mfu']:.0f}%{how}"


def markdown(cells: list[dict], gpu: str) -> str:
    lines = [f"Modeled on {step.RATES[gpu].name} (`python scripts/step_model_table.py --gpu "
             f"{gpu}`); tokens/s per GPU / MFU (causal convention). Not measured.", "",
             "| setup | row | S | paper | modeled, keep none | modeled, keep host | gain | "
             "host per node, host |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        p = c["paper"]
        p = f"{p:.0f}" if isinstance(p, (int, float)) else (p or "-")
        gain = (f"{100 * (c['host']['tps'] / c['none']['tps'] - 1):+.0f}%"
                if c["none"] and c["host"] else "-")
        host = f"{c['host']['host_node_gib']:.0f} GiB" if c["host"] else "-"
        lines.append(f"| {c['setup']} | {c['row']} | {_label(c['seq'])} | {p} | "
                     f"{_cell(c['none'])} | {_cell(c['host'])} | {gain} | {host} |")
    pairs = [(c["none"]["tps"], c["paper"]) for c in cells
             if c["none"] and isinstance(c["paper"], (int, float))]
    ratios = [m / p for m, p in pairs]
    cal = step.calibrate(pairs)
    lines += ["", f"Model / paper over the {len(pairs)} lengths and rows the paper measured "
              f"(keep none, the paper's configuration): median {statistics.median(ratios):.2f}, "
              f"range {min(ratios):.2f} to {max(ratios):.2f}. Calibrated on the paper "
              f"(x{cal.scale:.2f}), the largest error left is {100 * cal.max_error:.0f}%."]
    return "\n".join(lines)


def plot(cells: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = sorted({c["setup"] for c in cells}, reverse=True)
    fig, axes = plt.subplots(1, len(setups), figsize=(6 * len(setups), 4.5))
    for ax, setup in zip(axes, setups):
        for row in ("Ulysses", "UPipe", "Ring"):
            sel = [c for c in cells if c["setup"] == setup and c["row"] == row]
            for keep, style in (("none", "-"), ("host", "--")):
                pts = [(c["seq"], c[keep]["tps"]) for c in sel if c[keep]]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", label=f"{row}, keep {keep} (modeled)")
            meas = [(c["seq"], c["paper"]) for c in sel if isinstance(c["paper"], (int, float))]
            if meas:
                ax.plot(*zip(*meas), ":", marker="x", color="gray", alpha=0.7)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("tokens/s per GPU")
        ax.set_title(f"{setup}: modeled (x: the paper's Table 3)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", default="h100", choices=sorted(step.RATES))
    ap.add_argument("--png", help="also plot the table to this PNG")
    args = ap.parse_args(argv)
    cells = rows(args.gpu)
    print(markdown(cells, args.gpu))
    if args.png:
        plot(cells, args.png)


if __name__ == "__main__":
    main()
