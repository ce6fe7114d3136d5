"""Plot benchmark JSON as PNGs: memory and tokens/s per GPU vs length.

    python scripts/plot_benchmarks.py docs/results/NAME.json [more.json ...] --out-dir docs/results

The options are :mod:`benchmarks.plots`'s (``--help``).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.plots import main  # noqa: E402

if __name__ == "__main__":
    main()
