"""The test files run in a random order: ``--shuffle-files SEED|random|off`` (default random).

Tests must pass in any order and any subset: no state may leak from one file into the next.
So every run, CI's included (``.ci/run``), draws a seed, shuffles the files with it and
prints it (in the header, and after the results, also under ``-q``); ``--shuffle-files SEED`` replays an order, ``--shuffle-files off``
keeps pytest's.  Tests within a file keep their order, so module-scoped fixtures are built
once.

Under pytest-xdist (the README's test command runs ``-n 2 --dist loadfile``) the controller
draws the seed and hands it to every worker, so all of them collect the same order (xdist
refuses workers whose collections differ), and each file runs whole on one worker, in the
shuffled order of the files.
"""

from __future__ import annotations

import random

import pytest


def pytest_addoption(parser):
    parser.addoption("--shuffle-files", metavar="SEED", default="random",
                     help="run the test files in a random order drawn with this seed "
                          "(default: a new seed each run, printed; 'off': pytest's order)")


def _seed(config) -> str | None:
    worker = getattr(config, "workerinput", None)
    if worker is not None:  # an xdist worker: the controller's seed
        return worker["shuffle_seed"]
    value = config.getoption("--shuffle-files")
    if value == "off":
        return None
    if value == "random":
        value = str(random.SystemRandom().randrange(100_000))
        config.option.shuffle_files = value  # one seed for the header and the collection
    return value


def pytest_configure(config):
    config._shuffle_seed = _seed(config)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """xdist, on the controller: each worker gets the controller's seed."""
    node.workerinput["shuffle_seed"] = node.config._shuffle_seed


def _order_line(config) -> str:
    seed = config._shuffle_seed
    if seed is None:
        return "test files in pytest's order (--shuffle-files off)"
    return f"test files shuffled with seed {seed} (replay the order: --shuffle-files {seed})"


def pytest_report_header(config):
    return _order_line(config)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    terminalreporter.write_line(_order_line(config))  # also under -q, next to the result


def pytest_collection_modifyitems(session, config, items):
    seed = config._shuffle_seed
    if seed is None:
        return
    by_file: dict[str, list] = {}
    for item in items:
        by_file.setdefault(str(item.path), []).append(item)
    files = list(by_file)
    random.Random(seed).shuffle(files)
    items[:] = [item for f in files for item in by_file[f]]
