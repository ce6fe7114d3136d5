"""``--shuffle-files SEED`` (tests/conftest.py) reorders the test files, reproducibly."""

import os
import re
import subprocess
import sys

from tests.helpers.paths import ROOT


def _order(tmp_path, *args):
    for name in "abcdef":
        (tmp_path / f"test_{name}.py").write_text(
            f"def test_one():\n    print('RAN {name}1')\n\ndef test_two():\n    print('RAN {name}2')\n")
    (tmp_path / "conftest.py").write_text(open(os.path.join(ROOT, "tests", "conftest.py")).read())
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                           str(tmp_path), *args], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return re.findall(r"RAN (\w\d)", proc.stdout)


def test_files_are_shuffled_reproducibly_and_tests_keep_their_order_within_a_file(tmp_path):
    plain = _order(tmp_path)
    assert plain == [f"{n}{i}" for n in "abcdef" for i in (1, 2)]
    shuffled = _order(tmp_path, "--shuffle-files", "7")
    assert shuffled != plain and sorted(shuffled) == sorted(plain)
    assert all(shuffled[i][0] == shuffled[i + 1][0] and shuffled[i][1] == "1"
               for i in range(0, len(shuffled), 2))  # each file's tests together, in order
    assert _order(tmp_path, "--shuffle-files", "7") == shuffled
