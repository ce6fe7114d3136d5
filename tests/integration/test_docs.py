"""The docs cannot drift from the code: schedule tables and hybrid layouts are re-derived.

* ``scripts/schedule_diagram.py`` prints the paper's GQA example (H=16, H_kv=4, C=4, U=4).
* Every fenced block in ``docs/upipe.md`` that starts with ``$ python scripts/schedule_diagram.py
  ARGS`` must equal what the script prints for ARGS now.
* The ``cp rank ... tokens`` lines and the round-robin example in ``docs/hybrid.md`` must match
  :class:`~torchtitan_upipe.titan.sharding.UlyssesRingSharder` and the all-to-all's gather order.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from torchtitan_upipe.titan.sharding import UlyssesRingSharder
from torchtitan_upipe.cp.zigzag import zigzag_indices

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "schedule_diagram.py"
UPIPE_DOC = ROOT / "docs" / "upipe.md"
HYBRID_DOC = ROOT / "docs" / "hybrid.md"
PROMPT = "$ python scripts/schedule_diagram.py"


def _script():
    spec = importlib.util.spec_from_file_location("schedule_diagram", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(text: str) -> dict[int, list[tuple[list[int], list[int]]]]:
    """stage -> per rank (query heads, KV heads), parsed from the plain-text table."""
    rows = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4 or not fields[0].isdigit():
            continue
        cells = re.findall(r"q([\d,]+) kv([\d,]+)", line)
        rows[int(fields[0])] = [
            ([int(h) for h in q.split(",")], [int(h) for h in kv.split(",")]) for q, kv in cells
        ]
    return rows


def _kv_sent(text: str) -> dict[int, str]:
    return {int(f[0]): f[2] for f in (line.split() for line in text.splitlines()) if len(f) > 3 and f[0].isdigit()}


def _doc_diagrams(path: Path) -> list[tuple[str, str]]:
    """(args, body) of every fenced block whose first line is the diagram command."""
    blocks, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("```") and i + 1 < len(lines) and lines[i + 1].startswith(PROMPT):
            args = lines[i + 1][len(PROMPT):].strip()
            j = i + 2
            while not lines[j].startswith("```"):
                j += 1
            blocks.append((args, "\n".join(lines[i + 2 : j]) + "\n"))
            i = j
        i += 1
    return blocks


def test_paper_example_rows():
    text = _script().diagram([])  # the defaults are the paper's example
    assert "H=16 query heads, H_kv=4 KV heads, C=4 ranks, U=4" in text
    rows = _rows(text)
    assert {s: [q for q, _ in r] for s, r in rows.items()} == {
        0: [[0], [4], [8], [12]],
        1: [[1], [5], [9], [13]],
        2: [[2], [6], [10], [14]],
        3: [[3], [7], [11], [15]],
    }
    # KV head r on rank r at every stage, sent once (stage 0), reused by stages 1-3
    assert all([kv for _, kv in r] == [[0], [1], [2], [3]] for r in rows.values())
    assert _kv_sent(text) == {0: "yes", 1: "no", 2: "no", 3: "no"}


def test_llama_u_2c_and_replication_rows():
    mod = _script()
    rows = _rows(mod.render(32, 8, 8, 16))
    assert rows[0][0] == ([0, 1], [0]) and rows[1][7] == ([30, 31], [7])
    text = mod.render(8, 2, 4, 4)  # H_kv < C: each KV head on 2 ranks
    assert "rho=2" in text and "replicated on 2 ranks" in text
    assert [kv for _, kv in _rows(text)[0]] == [[0], [0], [1], [1]]
    sent = _kv_sent(mod.render(32, 8, 4, 4))  # two KV chunks: K/V sent at stages 0 and 4
    assert [s for s, v in sent.items() if v == "yes"] == [0, 4]


def test_markdown_table_has_the_same_cells():
    mod = _script()
    md = mod.diagram(["--markdown"])
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert table[0].startswith("| stage | chunk | K\\|V a2a | rank 0 |")
    assert set(table[1]) <= {"|", "-"}
    assert table[2] == "| 0 | 0 | yes | q0 kv0 | q4 kv1 | q8 kv2 | q12 kv3 |"
    assert len(table) == 2 + 4


def test_invalid_layout_is_an_error(capsys):
    assert _script().main(["--chunk-heads", "6"]) == 2
    assert "valid: [4, 8, 16]" in capsys.readouterr().err


def test_upipe_doc_diagrams_match_the_script():
    mod = _script()
    blocks = _doc_diagrams(UPIPE_DOC)
    shown = {args for args, _ in blocks}
    for required in (
        "--heads 16 --kv-heads 4 --degree 4 --chunk-heads 4",
        "--heads 32 --kv-heads 8 --degree 8 --chunk-heads 8",
        "--heads 32 --kv-heads 8 --degree 8 --chunk-heads 16",
    ):
        assert required in shown, f"docs/upipe.md lost the diagram for {required}"
    for args, body in blocks:
        assert body == mod.diagram(shlex.split(args)), (
            f"docs/upipe.md is out of date for `{PROMPT} {args}`: paste the script's output"
        )


def test_hybrid_doc_layout_matches_the_sharder():
    text = HYBRID_DOC.read_text()
    lines = re.findall(r"cp rank (\d+)\s+\(ring (\d+), ulysses (\d+)\)\s+tokens (\d+)\.\.(\d+)", text)
    assert len(lines) == 4
    for cp, ring, uly, lo, hi in (tuple(map(int, m)) for m in lines):
        assert cp == ring * 2 + uly
        assert UlyssesRingSharder(2, 2, uly, ring).indices(16).tolist() == list(range(lo, hi + 1))


def _round_robin(seq: int, c: int, r: int) -> list[int]:
    n = seq // (2 * c)
    j = 2 * c - 1 - r
    return list(range(r * n, (r + 1) * n)) + list(range(j * n, (j + 1) * n))


def test_hybrid_doc_round_robin_example():
    text = HYBRID_DOC.read_text()
    for r in range(4):
        shown = re.search(rf"cp rank {r}: ([\d, ]+\d)", text).group(1)
        assert [int(t) for t in shown.split(",")] == _round_robin(16, 4, r)
    gathered = _round_robin(16, 4, 0) + _round_robin(16, 4, 1)  # all-to-all group {0, 1}
    assert str(gathered) in text
    assert gathered != zigzag_indices(16, 2, 0).tolist()


@pytest.mark.parametrize("u,ring", [(8, 2)])
def test_hybrid_doc_sixteen_gpu_words(u, ring):
    # "CP ranks 0-3 hold the four consecutive quarters of c0, and CP ranks 4-7 ... of c3"
    seq = 64
    chunk = seq // (2 * ring)
    owner = {}
    for p in range(ring):
        for j in range(u):
            for t in UlyssesRingSharder(u, ring, j, p).indices(seq).tolist():
                owner[t] = p * u + j
    c = [range(k * chunk, (k + 1) * chunk) for k in range(2 * ring)]
    assert {owner[t] for t in c[0]} == {0, 1, 2, 3} and {owner[t] for t in c[3]} == {4, 5, 6, 7}
    assert {owner[t] for t in c[1]} == {8, 9, 10, 11} and {owner[t] for t in c[2]} == {12, 13, 14, 15}


def test_ci_runs_the_readmes_test_command_verbatim():
    """``.ci/run`` runs the README's test command as a new user would: its last line is one
    of the README's bash blocks, the one that installs the test extras and runs pytest."""
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    assert ci in blocks, (ci, blocks)
    assert "pytest" in ci and '".[test]"' in ci
