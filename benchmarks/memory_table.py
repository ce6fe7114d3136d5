"""Print the analytic per-rank memory breakdown (torchtitan_upipe.titan.memory_model), in GiB.

    python scripts/memory_table.py              # aligned text
    python scripts/memory_table.py --markdown   # markdown tables (docs/memory.md)
    python scripts/memory_table.py --estimates docs/results/NAME*.json
        # the model next to the CPU estimator's full-depth estimates (docs/benchmarks.md)
    python scripts/memory_table.py --keep --markdown
        # what memory.keep_attention_output costs, device and host (docs/memory.md)
    python scripts/memory_table.py --wall --markdown
        # each memory option past the paper's wall alone and all together (docs/memory.md)

Tables: Llama3-8B on 8 ranks (C = N = 8, b = 1) at 1M/3M/5M tokens for ulysses and upipe
(U = 8), with the whole [memory] stack on, on with ``memory.offload_prefetch = false``, and
off; the 32B flavor on 16 ranks (u = 8 x ring 2)
for the usp and upipe hybrids at 1M/2M/4M with the stack on.  Derived from formulas, not
measured.  1M = 2**20 tokens.
"""

from __future__ import annotations

import argparse

from torchtitan_upipe.titan.memory_model import (
    from_job_config,
    GiB,
    Setup,
    breakdown,
    from_flavor,
    peak_location,
    replace,
    stack,
)

M = 1 << 20
COLUMNS = [
    ("model_states", "model"),
    ("rope_table", "rope tbl"),
    ("checkpointed_inputs_device", "ckpt dev"),
    ("checkpointed_inputs_host", "ckpt host"),
    ("attention_transient", "attention"),
    ("mlp_transient", "mlp"),
    ("norm_transient", "norm"),
    ("logits", "logits"),
]


def llama8b_rows() -> list[tuple[str, Setup]]:
    rows = []
    for label, on, prefetch in (("stack on", True, True),
                                ("stack on, prefetch off", True, False),
                                ("stack off", False, True)):
        for mult in (1, 3, 5):
            for style in ("ulysses", "upipe"):
                st = from_flavor("8B", seq_len=mult * M, cp=8, world=8, style=style, chunk_heads=8)
                rows.append((f"{style} {mult}M {label}",
                             replace(stack(st, on), offload_prefetch=prefetch)))
    return rows


def qwen32b_rows() -> list[tuple[str, Setup]]:
    rows = []
    for mult in (1, 2, 4):
        for style in ("usp", "upipe"):
            st = from_flavor("32B", seq_len=mult * M, cp=16, ulysses=8, world=16, style=style,
                             chunk_heads=8)
            rows.append((f"{style} 8x2 {mult}M stack on", stack(st, True)))
    return rows


KEEP_LENGTHS = (M // 8, M // 2, M, 2 * M, 3 * M, 4 * M, 5 * M)


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n < M else f"{n // M}M"


def keep_table(markdown: bool) -> str:
    """``memory.keep_attention_output`` for Llama3-8B on 8 ranks (U = 8 and Ulysses, the
    stack on, prefetch on, offload_keep_layers = 1): peak device GiB per rank for "none",
    "device" and "host", and the host GiB per rank and per 8-GPU node for "none" and "host"."""
    head = ["style", "S", "peak none", "peak device", "peak host", "host none / rank",
            "host host / rank", "host host / node"]
    body = []
    for style in ("upipe", "ulysses"):
        for seq in KEEP_LENGTHS:
            base = stack(from_flavor("8B", seq_len=seq, cp=8, world=8, style=style,
                                     chunk_heads=8 if style == "upipe" else 0))
            d = {k: breakdown(replace(base, keep_attention=k)) for k in ("none", "device", "host")}
            body.append([style, _tokens(seq)]
                        + [f"{d[k]['peak_device'] / GiB:.1f}" for k in ("none", "device", "host")]
                        + [f"{d['none']['host'] / GiB:.1f}", f"{d['host']['host'] / GiB:.1f}",
                           f"{8 * d['host']['host'] / GiB:.0f}"])
    return _format(head, body, markdown)


WALL_SETUPS = (("Llama3-8B, 8 ranks", "8B", 8, 0), ("Llama3-8B, 16 ranks (8 x 2)", "8B", 16, 8),
               ("32B flavor, 16 ranks (8 x 2)", "32B", 16, 8))
"""UPipe (U = 8) on the paper's three setups: (name, flavor, ranks, all-to-all degree)."""

WALL_CHANGES = (
    ("the stack (offload_keep_layers = 1, prefetch on)", {}),
    ("offload_prefetch = false", {"offload_prefetch": False}),
    ("offload_keep_layers = 0", {"keep_layers": 0}),
    ("offload_refetch_input = true", {"refetch_input": True}),
    ("offload_optimizer_state = true", {"offload_optimizer": True}),
    ("offload_inplace_residual_grads = true", {"inplace_grads": True}),
    ("fuse_output_projection = true", {"fused_wo": True}),
    ("all six", ALL_SIX := {"offload_prefetch": False, "keep_layers": 0, "refetch_input": True,
                            "offload_optimizer": True, "inplace_grads": True, "fused_wo": True}),
    ("all six, offload_stride = 2", {**ALL_SIX, "offload_stride": 2}),
)
"""The [memory] options past the paper's wall, each alone and all together (Setup fields)."""


def wall_table(markdown: bool, device_gib: float = 80.0, reserve_gib: float = 4.0,
               host_gib: float = 2048.0) -> str:
    """Per setup and change: the peak at 1M and 3M over the first 4 layers, and at full depth
    the longest context whose peak + reserve fits ``device_gib`` (device only, and also within
    ``host_gib`` per 8-GPU node), with its host memory per rank and node."""
    from torchtitan_upipe.titan import fitting as fm

    head = ["setup", "change", "1M, 4 layers", "3M, 4 layers", "max context (device)",
            "host / node there", f"max context (+ host <= {host_gib:g} GiB/node)",
            "host / rank there"]
    device = fm.Budget(device_gib, reserve_gib)
    both = fm.Budget(device_gib, reserve_gib, host_gib=host_gib, ranks_per_node=8)
    body = []
    for name, flavor, ranks, u in WALL_SETUPS:
        base = stack(from_flavor(flavor, seq_len=M, cp=ranks, world=ranks, style="upipe",
                                 ulysses=u, chunk_heads=8))
        for change, fields in WALL_CHANGES:
            st = replace(base, **fields)
            short = [breakdown(replace(st, seq_len=n * M, n_layers=4))["peak_device"] / GiB
                     for n in (1, 3)]
            longest = [fm.max_context(st, b) for b in (device, both)]
            host = [breakdown(replace(st, seq_len=n))["host"] / GiB for n in longest]
            body.append([name, change] + [f"{x:.1f}" for x in short]
                        + [f"{longest[0] / M:.2f}M", f"{8 * host[0]:.0f}",
                           f"{longest[1] / M:.2f}M", f"{host[1]:.0f}"])
    return _format(head, body, markdown, text_columns=2)


def table(rows: list[tuple[str, Setup]], markdown: bool) -> str:
    head = ["config"] + [c for _, c in COLUMNS] + ["peak at", "PEAK dev"]
    body = []
    for name, st in rows:
        d, (layer, phase) = breakdown(st), peak_location(st)
        cells = [f"{d[k] / GiB:.1f}" for k, _ in COLUMNS]
        where = phase if layer is None else f"layer {layer} {phase}"
        body.append([name] + cells + [where, f"{d['peak_device'] / GiB:.1f}"])
    return _format(head, body, markdown)


def _format(head: list[str], body: list[list[str]], markdown: bool, text_columns: int = 1) -> str:
    """A table; the first ``text_columns`` columns are left-aligned, the (numeric) rest right."""
    if markdown:
        rule = "|" + "|".join(["---"] * text_columns + ["---:"] * (len(head) - text_columns)) + "|"
        out = ["| " + " | ".join(head) + " |", rule]
        out += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(out)
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]

    def fmt(r):
        cells = (c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        return "  ".join(cells)

    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])


def setup_of_run(spec: dict) -> Setup:
    """The model's Setup for a benchmark run spec (``runner.RunSpec`` as saved in JSON): the
    job options parsed as train.py parses them, ``ngpu`` ranks, nothing built.  The model is of
    the job's worst rank (a causal ring's ranks differ; the spec's ``rank`` does not enter)."""
    from torchtitan.config import ConfigManager

    import torchtitan_upipe.train_spec  # noqa: F401  (registers the model)

    from . import runner

    job = ConfigManager().parse_args(runner.train_args(runner.RunSpec(**spec), "unused"))
    return from_job_config(job, spec["ngpu"])


def estimate_table(paths: list[str]) -> str:
    """Full-depth estimates of the runs in ``paths`` (bench_one_rank.py --estimate JSON) next
    to the model's peak for the same options, as a markdown table."""
    import json

    rows = ["| run | estimate | analytic model | model / estimate - 1 | host |",
            "|---|---:|---:|---:|---:|"]
    for path in paths:
        with open(path) as f:
            runs = json.load(f)["runs"]
        for run in runs:
            spec = run["spec"]
            if run.get("kind") != "estimate" or not run["ok"] or spec["n_layers"]:
                continue
            model = breakdown(setup_of_run(spec))["peak_device"] / GiB
            est = run["est_peak_gib"]
            extra = " ".join(spec["extra"])
            rows.append(f"| {run['label']}{' ' + extra if extra else ''} | {est:.2f} | "
                        f"{model:.2f} | {100 * (model / est - 1):+.1f}% | "
                        f"{run['est_host_gib']:.2f} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--markdown", action="store_true", help="emit markdown tables")
    ap.add_argument("--estimates", nargs="+", metavar="JSON",
                    help="compare the model with these estimator results instead")
    ap.add_argument("--keep", action="store_true",
                    help="what memory.keep_attention_output costs instead")
    ap.add_argument("--wall", action="store_true",
                    help="the [memory] options past the paper's wall, alone and together, instead")
    args = ap.parse_args(argv)
    if args.wall:
        print("UPipe (U = 8), per-rank GiB and maximum contexts at full depth under 80 GiB with "
              "a 4 GiB reserve, derived (not measured)\n")
        print(wall_table(args.markdown))
        return
    if args.estimates:
        print(estimate_table(args.estimates))
        return
    if args.keep:
        print("Llama3-8B, 8 ranks (C = N = 8, b = 1), the memory stack on: "
              "memory.keep_attention_output, per-rank GiB, derived (not measured)\n")
        print(keep_table(args.markdown))
        return
    print("Llama3-8B, 8 ranks (C = N = 8, b = 1), per-rank GiB, derived (not measured)\n")
    print(table(llama8b_rows(), args.markdown))
    print("\n32B flavor, 16 ranks (Ulysses 8 x ring 2, N = 16, b = 1), per-rank GiB, derived\n")
    print(table(qwen32b_rows(), args.markdown))
    print("\nPEAK dev = model + rope tbl + ckpt dev + the phase where the step peaks (a phase of "
          "one layer's recompute + backward, or the loss); model = the model states alive "
          "there; the transient columns are each component's own peak and do not add up.  "
          "ckpt host = pinned host memory per rank.  \"prefetch off\" = "
          "memory.offload_prefetch = false: one block input less during a layer's backward.")


if __name__ == "__main__":
    main()
