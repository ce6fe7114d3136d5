"""Print the analytic per-rank memory tables, or the model next to the CPU estimator's figures.

    python scripts/memory_table.py [--markdown]
    python scripts/memory_table.py --estimates docs/results/NAME*.json

The options are :mod:`benchmarks.memory_table`'s (``--help``).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.memory_table import main  # noqa: E402

if __name__ == "__main__":
    main()
