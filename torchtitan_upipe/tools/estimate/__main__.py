"""``python -m torchtitan_upipe.tools.estimate``: the CPU memory estimator's command line.

See :mod:`.estimator` for what it does; every option it does not know is train.py's. It prints
a short summary (:func:`~.estimator.summary`), or the estimate as JSON with ``--json``; a user
error is one line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from ...titan.config import ConfigError
from ...titan.console import clean_console, user_errors
from ...titan.cpu_compat import cpu_compat
from .estimator import Estimate, estimate_memory, format_breakdown, summary

PROG = "python -m torchtitan_upipe.tools.estimate"


def _parser() -> argparse.ArgumentParser:
    from ...titan.fitting import DEFAULT_RESERVE_GIB

    parser = argparse.ArgumentParser(
        prog=PROG,
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
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")
    parser.add_argument("--out", metavar="FILE", help="also write the estimate to this JSON file")
    parser.add_argument("--rank", type=int, default=None,
                        help="simulate this rank of the job (default: --benchmark.fake_rank, 0); "
                        "ranks of a ring differ in memory (the causal zigzag ring merges more "
                        "on some ranks)")
    parser.add_argument("--breakdown", type=int, default=0, metavar="N",
                        help="print the N largest groups of tensors alive at the peak, by the "
                        "op and source line that made them")
    parser.add_argument("--gpu", help="judge the peak against this GPU's memory: "
                        "h100, h200, a100 or b200")
    parser.add_argument("--device-gib", type=float, default=None,
                        help="judge the peak against this much device memory per GPU (GiB; "
                        "default: --gpu's, else benchmark.device_memory_gib or "
                        "memory.device_gib if the config sets one)")
    parser.add_argument("--reserve-gib", type=float, default=DEFAULT_RESERVE_GIB,
                        help="device memory kept free of the peak for what the estimate leaves "
                        "out (CUDA context, NCCL buffers, fragmentation; default %(default)s)")
    parser.add_argument("--gpus-per-node", type=int, default=8,
                        help="ranks sharing one host's memory (default %(default)s)")
    return parser


def _budget(ours, job_device_gib: float):
    from ...titan.fitting import Budget, get_gpu

    device = ours.device_gib
    if device is None and ours.gpu:
        device = get_gpu(ours.gpu).memory_gib
    if device is None and job_device_gib:
        device = job_device_gib
    if device is None:
        return None
    try:
        return Budget(device, ours.reserve_gib)
    except ConfigError as e:  # name the options the values came from
        raise ConfigError(f"--reserve-gib {ours.reserve_gib:g}, --device-gib or --gpu: {e}") from None


def main(args: list[str] | None = None) -> Estimate:
    # cpu_compat before TorchTitan is first imported; TorchTitan's warnings that do not apply
    # to an estimate are dropped
    with clean_console(), cpu_compat(), user_errors(PROG):
        return _main(args)


def _main(args: list[str] | None) -> Estimate:
    parser = _parser()
    ours, rest = parser.parse_known_args(sys.argv[1:] if args is None else args)
    if ours.breakdown < 0:
        raise ConfigError(f"--breakdown must be >= 0, got {ours.breakdown}")
    if ours.gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node must be >= 1, got {ours.gpus_per_node}")
    budget = _budget(ours, 0.0)  # a bad device or reserve fails before the minutes of estimating
    est = estimate_memory(rest, ours.ngpu, ours.steps, ours.target, fake=not ours.real,
                          breakdown=ours.breakdown, rank=ours.rank)
    out = est.to_json()
    if ours.json:
        print(json.dumps(out, indent=1))
    else:
        budget = budget or _budget(ours, est.device_gib)
        print(summary(est, budget, min(ours.gpus_per_node, ours.ngpu)))
    if est.breakdown:
        print(format_breakdown(est))
    if ours.out:
        with open(ours.out, "w") as f:
            json.dump(out, f, indent=1)
    return est


if __name__ == "__main__":
    main()
