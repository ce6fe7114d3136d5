"""``--shuffle-files`` (tests/conftest.py): the test files run in a random order by default,
reproducibly with a seed, in pytest's order with ``off``."""

import os
import re
import shlex
import subprocess
import sys

from tests.helpers.paths import ROOT


def _write_suite(tmp_path):
    """Six files of two tests each, under the project's conftest."""
    for name in "abcdef":
        (tmp_path / f"test_{name}.py").write_text(
            f"def test_one():\n    print('RAN {name}1')\n\ndef test_two():\n    print('RAN {name}2')\n")
    (tmp_path / "conftest.py").write_text(open(os.path.join(ROOT, "tests", "conftest.py")).read())


def _order(tmp_path, *args):
    _write_suite(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                           str(tmp_path), *args], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return re.findall(r"RAN (\w\d)", proc.stdout), proc.stdout


def test_files_are_shuffled_reproducibly_and_tests_keep_their_order_within_a_file(tmp_path):
    plain, out = _order(tmp_path, "--shuffle-files", "off")
    assert plain == [f"{n}{i}" for n in "abcdef" for i in (1, 2)]
    assert "test files in pytest's order (--shuffle-files off)" in out
    shuffled, out = _order(tmp_path, "--shuffle-files", "7")
    assert shuffled != plain and sorted(shuffled) == sorted(plain)
    assert all(shuffled[i][0] == shuffled[i + 1][0] and shuffled[i][1] == "1"
               for i in range(0, len(shuffled), 2))  # each file's tests together, in order
    assert "test files shuffled with seed 7 (replay the order: --shuffle-files 7)" in out
    assert _order(tmp_path, "--shuffle-files", "7")[0] == shuffled
    # by default each run draws a seed, prints it, and that seed replays the run's order
    drawn, out = _order(tmp_path)
    seed = re.search(r"test files shuffled with seed (\d+)", out).group(1)
    assert sorted(drawn) == sorted(plain)
    assert _order(tmp_path, "--shuffle-files", seed)[0] == drawn


def test_xdist_workers_share_the_seed_and_each_file_stays_on_one_worker(tmp_path):
    """The README's test command (``.ci/run``'s last line) runs xdist workers: every worker
    collects the controller's order, drawn or given (xdist stops the run when workers'
    collections differ), and a file's tests run on one worker."""
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        command = shlex.split(f.read().strip().splitlines()[-1].split("python -m pytest", 1)[1])
    assert command[:1] == ["-q"] and "-n" in command and "loadfile" in command, command
    xdist = command[1:]
    _write_suite(tmp_path)
    for args in ((), ("--shuffle-files", "7")):
        proc = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                               *xdist, str(tmp_path), *args], capture_output=True,
                              text=True, cwd=tmp_path, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "12 passed" in proc.stdout and "test files shuffled with seed" in proc.stdout
        ran = re.findall(r"\[(gw\d)\].*PASSED test_(\w)\.py::test_(one|two)", proc.stdout)
        assert len(ran) == 12 and len({w for w, _, _ in ran}) == 2, proc.stdout
        workers = {}
        for worker, name, test in ran:
            workers.setdefault(name, set()).add(worker)
        assert all(len(w) == 1 for w in workers.values()), workers
