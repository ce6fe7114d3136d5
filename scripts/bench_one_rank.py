"""Benchmark context-parallel styles on one device, one real rank of an N-GPU job per run.

    python scripts/bench_one_rank.py --config train_configs/llama3_8b_8xh100_upipe.toml \\
        --styles upipe:8 ulysses --seq-lens 128K 256K --layers 1 2 0 --out docs/results/NAME.json

The options are :mod:`benchmarks.sweep`'s (``--help``).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.sweep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
