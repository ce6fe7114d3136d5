"""``--shuffle-files SEED``: run the test files in a seeded random order.

Tests must pass in any order and any subset: no state may leak from one file into the next.
CI runs the quick subset once more with the files shuffled (``.ci/run``), and prints the seed
so that an order-dependent failure can be replayed. Tests within a file keep their order, so
module-scoped fixtures are built once.
"""

from __future__ import annotations

import random


def pytest_addoption(parser):
    parser.addoption("--shuffle-files", metavar="SEED", default=None,
                     help="run the test files in a random order drawn with this seed")


def pytest_report_header(config):
    seed = config.getoption("--shuffle-files")
    return None if seed is None else f"test files shuffled with seed {seed}"


def pytest_collection_modifyitems(session, config, items):
    seed = config.getoption("--shuffle-files")
    if seed is None:
        return
    by_file: dict[str, list] = {}
    for item in items:
        by_file.setdefault(str(item.path), []).append(item)
    files = list(by_file)
    random.Random(seed).shuffle(files)
    items[:] = [item for f in files for item in by_file[f]]
