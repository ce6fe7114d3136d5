"""``python -m torchtitan_upipe.tools.estimate``: the CPU memory estimator's command line.

See :mod:`.estimator` for what it does; every option it does not know is train.py's.
"""

from __future__ import annotations

import argparse
import json
import sys

from .estimator import Estimate, estimate_memory, format_breakdown


def main(args: list[str] | None = None) -> Estimate:
    parser = argparse.ArgumentParser(
        description="Estimate one rank's peak memory for train.py's options, on CPU (fake tensors)",
        epilog="All other options are train.py's (TorchTitan's), e.g. --job.config_file and "
        "--training.seq_len.",
    )
    parser.add_argument("--ngpu", type=int, required=True, help="ranks in the simulated job")
    parser.add_argument("--steps", type=int, default=2, help="training steps to run (>= 2)")
    parser.add_argument("--target", choices=("cuda", "cpu"), default="cuda",
                        help="add the CUDA kernels' workspaces (cuda) or not (cpu)")
    parser.add_argument("--real", action="store_true",
                        help="measure with real tensors instead (small shapes; checks the estimate)")
    parser.add_argument("--json", help="also write the estimate to this JSON file")
    parser.add_argument("--rank", type=int, default=None,
                        help="simulate this rank of the job (default: --benchmark.fake_rank, 0); "
                        "ranks of a ring differ in memory (the causal zigzag ring merges more "
                        "on some ranks)")
    parser.add_argument("--breakdown", type=int, default=0, metavar="N",
                        help="print the N largest groups of tensors alive at the peak, by the "
                        "op and source line that made them")
    ours, rest = parser.parse_known_args(sys.argv[1:] if args is None else args)
    if ours.breakdown < 0:
        parser.error(f"--breakdown must be >= 0, got {ours.breakdown}")
    est = estimate_memory(rest, ours.ngpu, ours.steps, ours.target, fake=not ours.real,
                          breakdown=ours.breakdown, rank=ours.rank)
    out = est.to_json()
    print(json.dumps(out, indent=1))
    if est.breakdown:
        print(format_breakdown(est))
    if ours.json:
        with open(ours.json, "w") as f:
            json.dump(out, f, indent=1)
    return est


if __name__ == "__main__":
    main()
