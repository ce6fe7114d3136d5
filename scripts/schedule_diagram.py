"""Print the UPipe GQA stage schedule as a table: which rank computes which heads at each stage.

Every entry comes from :class:`torchtitan_upipe.cp.upipe.UPipeSchedule`, the object the op itself
runs, so the table cannot disagree with the code.  One row per stage, one column per rank of
the all-to-all group.  A cell ``q4,5 kv1`` means: at this stage the rank computes canonical
query heads 4 and 5 against canonical (real) KV head 1, over the whole sequence.  The
``K|V a2a`` column says whether the stage projects K/V and all-to-alls them (first stage of a
KV chunk) or reuses the chunk already in place.

    python scripts/schedule_diagram.py                       # the paper's example: 16, 4, C=4, U=4
    python scripts/schedule_diagram.py --heads 32 --kv-heads 8 --degree 8 --chunk-heads 16
    python scripts/schedule_diagram.py --markdown            # a markdown table instead
"""

from __future__ import annotations

import argparse
import sys

from torchtitan_upipe.cp.upipe import UPipeSchedule


def _ids(heads: list[int]) -> str:
    return ",".join(str(h) for h in heads)


def render(heads: int, kv_heads: int, degree: int, chunk_heads: int, markdown: bool = False) -> str:
    """The schedule of ``UPipeSchedule(heads, kv_heads, degree, chunk_heads)`` as text."""
    s = UPipeSchedule(heads, kv_heads, degree, chunk_heads)
    header = [
        f"UPipe stage schedule: H={heads} query heads, H_kv={kv_heads} KV heads, "
        f"C={degree} ranks, U={chunk_heads} query heads per stage",
        f"rho={s.rho}  H_kv'={s.virtual_kv_heads}  g={s.group_size}  m=U/C={s.heads_per_rank}  "
        f"gamma={s.gamma}  kappa={s.kappa}  tau={s.stages_per_chunk}  "
        f"stages={s.n_stages}  KV chunks={s.n_chunks}",
        "cell: query heads and KV heads the rank computes at that stage (canonical ids)",
    ]
    if s.rho > 1:
        header.append(f"each real KV head is replicated on {s.rho} ranks (computation only)")
    cols = ["stage", "chunk", "K|V a2a"] + [f"rank {r}" for r in range(degree)]
    rows = []
    for stage in range(s.n_stages):
        chunk, t = divmod(stage, s.stages_per_chunk)
        kv = s.chunk_kv_heads_per_rank(chunk)
        q = s.stage_query_heads(stage)
        cells = [f"q{_ids(q[r])} kv{_ids(kv[r])}" for r in range(degree)]
        rows.append([str(stage), str(chunk), "yes" if t == 0 else "no"] + cells)

    if markdown:
        def md_row(cells: list[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

        lines = [f"**{header[0]}**", ""]
        for line in header[1:]:
            lines += [line, ""]
        lines += [md_row(cols), "|" + "|".join("---" for _ in cols) + "|"]
        lines += [md_row(r) for r in rows]
        return "\n".join(lines) + "\n"
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    lines = header + ["", fmt(cols), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", type=int, default=16, help="H, query heads (default 16)")
    p.add_argument("--kv-heads", type=int, default=4, help="H_kv, KV heads (default 4)")
    p.add_argument("--degree", type=int, default=4, help="C, ranks in the all-to-all group (default 4)")
    p.add_argument("--chunk-heads", type=int, default=4, help="U, query heads per stage over all C ranks (default 4)")
    p.add_argument("--markdown", action="store_true", help="emit a markdown table")
    return p.parse_args(argv)


def diagram(argv: list[str] | None = None) -> str:
    """``render`` for command-line arguments (what the script prints for ``argv``)."""
    a = parse_args(argv)
    return render(a.heads, a.kv_heads, a.degree, a.chunk_heads, markdown=a.markdown)


def main(argv: list[str] | None = None) -> int:
    try:
        text = diagram(argv)
    except ValueError as e:  # an invalid layout: UPipeSchedule's message names the fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
