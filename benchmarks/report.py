"""Turn the JSON of :func:`.runner.save` into full-depth figures, maximum contexts and tables.

Input: one or more files ``{"environment", "command", "runs": [RunResult as dict]}``.  Each run
is one rank of an ``ngpu``-GPU job at ``n_layers`` layers (0 = all) and ``seq_len`` tokens.
:mod:`.settings` resolves what each run measured, :mod:`.analysis` carries the runs to full
depth and finds the maximum contexts, :mod:`.render` writes the markdown next to the paper's
tables (:mod:`.paper`).

``python -m benchmarks.report docs/results/NAME.json [--out NAME.md]`` (from the repository
root)
"""

from __future__ import annotations

import argparse

from torchtitan_upipe.tools.perf_model import comm as cm

from .analysis import (DEVICE_GIB, HOST_GIB, RESERVE_GIB, MaxContext, Point, analyze,
                       host_per_node_gib, load, max_context)
from .render import fmt_len, markdown, paper_table, paper_tps
from .settings import Setting, display_names, setting_of

__all__ = ["DEVICE_GIB", "HOST_GIB", "RESERVE_GIB", "MaxContext", "Point", "Setting", "analyze",
           "display_names", "fmt_len", "host_per_node_gib", "load", "main", "markdown", "max_context", "paper_table",
           "paper_tps", "setting_of"]


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
