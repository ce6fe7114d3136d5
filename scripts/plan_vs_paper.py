"""The planner's predicted tokens/s per GPU next to the paper's measured Table 3.

    python scripts/plan_vs_paper.py [--mfu 0.5]

For each paper row that the planner models (Ulysses, UPipe U = 8, and the paper's "Ring"
as our zigzag ring: usp with ulysses_degree = 1), at every length of Table 3 where the paper
measured a number: our prediction (torchtitan_upipe.tools.plan.speed, H100, the committed
configs' options) and predicted / measured.  A prediction, not a measurement: it shows
how far the step-time model's assumptions are from the paper's GPUs.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import paper  # noqa: E402
from torchtitan_upipe.titan import fitting as fm  # noqa: E402
from torchtitan_upipe.titan import memory_model as mm  # noqa: E402
from torchtitan_upipe.tools.plan.speed import Hardware, predict  # noqa: E402

ROWS = {  # paper row -> (style, ulysses degree, U) for 8 ranks and for 16 (8 x 2)
    (("8B", 8), "Ulysses"): ("ulysses", 0, 0),
    (("8B", 8), "UPipe"): ("upipe", 0, 8),
    (("8B", 8), "Ring"): ("usp", 1, 0),
    (("32B", 16), "Ulysses"): ("usp", 8, 0),  # the paper's USP-Hybrid 8 x 2
    (("32B", 16), "UPipe"): ("upipe", 8, 8),
    (("32B", 16), "Ring"): ("usp", 1, 0),
}


def table(mfu: float) -> str:
    hw = Hardware(fm.GPUS["h100"], mfu=mfu)
    out = ["| setup | row | S | paper tokens/s/GPU | predicted | predicted / paper |",
           "|---|---|---:|---:|---:|---:|"]
    for (key, row), (style, u, big_u) in ROWS.items():
        measured = paper.table3(key).get(row, {})
        for seq, value in measured.items():
            if not isinstance(value, (int, float)):
                continue
            st = mm.stack(mm.from_flavor(key[0], seq_len=seq, cp=key[1], world=key[1],
                                         style=style, ulysses=u, chunk_heads=big_u))
            tps = predict(st, hw).tps
            out.append(f"| {key[0]} on {key[1]} | {row} | {seq // 1024}K | {value:.1f} | "
                       f"{tps:.1f} | {tps / value:.2f} |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mfu", type=float, default=Hardware(fm.GPUS["h100"]).mfu)
    args = ap.parse_args(argv)
    print(table(args.mfu))


if __name__ == "__main__":
    main()
