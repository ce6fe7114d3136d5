"""The UPipe paper's published figures, as data (``paper.json``), and which of our settings
reproduces each of its rows.

Each setup is a model flavor on a CP degree.  ``rows`` says which of our settings reproduces
a paper row (style, resolved all-to-all degree ``u``, UPipe's ``U``); on 8 GPUs the paper's
"Ulysses" and "UPipe" are all-to-all over the 8, on 16 they are the 8 x 2 hybrids (all-to-all
inside a node, a ring of 2 across).  ``table3`` holds tokens/s per GPU (``"OOM"``: out of
memory at that length; ``None``: already out of memory at a shorter length), ``max_context``
the longest context in tokens.
"""

from __future__ import annotations

import json
import os

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper.json")) as _f:
    _DATA = json.load(_f)

SOURCE: str = _DATA["source"]
GRID: tuple[int, ...] = tuple(_DATA["grid"])
"""The paper's sequence lengths (128K ... 8M)."""
TABLE3_SEQ_LENS: tuple[int, ...] = tuple(_DATA["table3_seq_lens"])

SETUPS: dict[tuple[str, int], dict] = {(s["flavor"], s["cp"]): s for s in _DATA["setups"]}
"""By ``(flavor, CP degree)``."""


def table3(key: tuple[str, int]) -> dict[str, dict[int, float | str | None]]:
    """Tokens/s per GPU by row and length (empty for a setup without a throughput table)."""
    rows = SETUPS.get(key, {}).get("table3", {})
    return {row: dict(zip(TABLE3_SEQ_LENS, vals)) for row, vals in rows.items()}


def max_context(key: tuple[str, int]) -> dict[str, int]:
    return dict(SETUPS.get(key, {}).get("max_context", {}))


def row_of(key: tuple[str, int], style: str, u: int, chunk_heads: int) -> str | None:
    """The paper row a setting of ``key`` reproduces, or ``None``."""
    for row, want in SETUPS.get(key, {}).get("rows", {}).items():
        have = {"style": style, "u": u, "U": chunk_heads}
        if all(have[k] == v for k, v in want.items()):
            return row
    return None
