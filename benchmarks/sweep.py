"""Benchmark context-parallel styles on one device: one real rank of an N-GPU job per run.

Every (style, sequence length, layer count) runs ``train.py --comm.mode fake_backend`` with
``NGPU=--ngpu`` (:mod:`.runner`): real compute and memory of rank 0, no-op collectives.
Results are appended to ``--out`` after every run (so an interrupted sweep keeps what it
measured); summarize them with ``python -m benchmarks.report OUT.json`` and plot with
``scripts/plot_benchmarks.py``.  ``scripts/bench_one_rank.py`` is this module's command.

    python scripts/bench_one_rank.py --config train_configs/llama3_8b_8xh100_upipe.toml --ngpu 8 \\
        --styles upipe:8 upipe:16 ulysses ring usp:u=1 --seq-lens 128K 256K 512K --layers 1 2 0 \\
        --steps 3 --warmup 1 --out docs/results/llama3_8b_8xh100.json -- --training.local_batch_size 1

Styles: ``NAME[:ARGS]`` with ``NAME`` a registered CP style other than ``none`` (ulysses |
upipe | ring | usp) or ``config`` (the config's own style) and ``ARGS`` comma-separated: a bare
integer or ``U=n`` (UPipe's chunk heads), ``u=n`` (all-to-all degree of the hybrids), ``r=n``
(run rank ``n`` of the job instead of rank 0: a causal ring's ranks differ in memory, so
``ring ring:r=7`` measures both ends).  Any config serves every style: a style that does not
stage heads resets UPipe's chunk heads to 0, and an all-to-all style that does not read
``ulysses_degree`` (ulysses) resets it to 0.  ``--layers 0`` is the flavor's full depth.
Arguments after ``--`` go to train.py unchanged.

``--estimate`` runs the CPU memory estimator (``python -m torchtitan_upipe.tools.estimate``: the same
options under fake tensors, no GPU) instead of training, and records its predicted peak and
host memory; the report puts them next to the GPU measurements and uses them to carry a
few-layer measurement to full depth.  ``--jobs 2`` runs two styles at once on a 2-core CPU.
``--dry-run`` runs nothing: it parses and validates every run's options for the ``N``-rank
CUDA job (on any machine) and prints the commands.

Stopping: the first run of a style that goes out of memory (on the device or on the host,
:func:`.runner.classify_failure`) ends that style's sweep; a run that times out at ``(S, L)``
skips that style's longer sequences at ``L`` and more layers, and more layers at ``S`` (time
grows with both).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from torchtitan_upipe.titan.styles import get_style, style_names

from . import runner

UNITS = {"K": 2**10, "M": 2**20}


def parse_len(text: str) -> int:
    """``131072``, ``128K``, ``1M``, ``1.5M`` -> tokens (K = 1024, M = 2**20)."""
    t = text.strip().upper()
    if t and t[-1] in UNITS:
        return int(float(t[:-1]) * UNITS[t[-1]])
    return int(t)


def parse_style(text: str) -> dict:
    """``upipe:8`` / ``upipe:U=16,u=8`` / ``usp:u=8,r=7`` / ``ulysses`` -> RunSpec fields."""
    name, _, args = text.partition(":")
    if name != "config" and (name == "none" or name not in style_names()):
        raise argparse.ArgumentTypeError(f"unknown style {name!r} in {text!r}")
    out: dict = {"style": None if name == "config" else name}
    if name != "config":
        style = get_style(name)
        if not style.stages_heads:
            out["chunk_heads"] = 0  # UPipe's U must be unset for other styles (config validation)
        if style.uses_all_to_all and not style.reads_ulysses_degree:
            out["ulysses_degree"] = 0  # the whole CP degree, whatever the config says
    for item in filter(None, args.split(",")):
        key, eq, val = item.partition("=")
        if not eq:
            key, val = "U", key
        if key == "U":
            out["chunk_heads"] = int(val)
        elif key == "u":
            out["ulysses_degree"] = int(val)
        elif key == "r":
            out["rank"] = int(val)
        else:
            raise argparse.ArgumentTypeError(f"unknown style argument {item!r} in {text!r}")
    return out


def config_cp_degree(config: str) -> int:
    with open(config, "rb") as f:
        return int(tomllib.load(f).get("parallelism", {}).get("context_parallel_degree", 1))


def _layer_key(n: int) -> float:
    return float("inf") if n == 0 else n  # 0 = full depth, the most layers


def _spec(args, extra: list[str], style: dict, seq: int, layers: int) -> runner.RunSpec:
    return runner.RunSpec(config=args.config, ngpu=args.ngpu, seq_len=seq, n_layers=layers,
                          steps=args.steps, warmup=args.warmup, extra=list(extra), **style)


def _grid(args) -> list[tuple[int, int]]:
    """``(S, L)`` in sweep order: lengths ascending, layer counts ascending (0 = all last)."""
    return [(seq, layers) for seq in sorted(args.seq_lens)
            for layers in sorted(args.layers, key=_layer_key)]


def _shown(spec: runner.RunSpec, estimate: bool) -> str:
    """The run's command as recorded (placeholders for the temporary folders)."""
    if estimate:
        return runner.shown_command(runner.estimate_command(spec, "$DUMP", "$OUT"))
    return f"NGPU={spec.ngpu} " + runner.shown_command(runner.command(spec, "$DUMP"))


def sweep(style: dict, args, extra: list[str], record, run=None) -> None:
    """All runs of one style: lengths ascending, layer counts ascending, stopping at the first
    OOM and skipping past timeouts.  ``run(spec, timeout)`` defaults to :func:`.runner.run`
    (or :func:`.runner.estimate` with ``--estimate``)."""
    run = run or (runner.estimate if args.estimate else runner.run)
    blocked: list[tuple[int, float]] = []  # (S, L) that failed: skip S' >= S and L' >= L
    for seq, layers in _grid(args):
        if any(seq >= s and _layer_key(layers) >= l for s, l in blocked):
            continue
        spec = _spec(args, extra, style, seq, layers)
        start = time.time()
        try:
            res = run(spec, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            res = runner.RunResult(spec, _shown(spec, args.estimate), ok=False, oom=False,
                                   kind="estimate" if args.estimate else "measured",
                                   error=f"timeout after {args.timeout} s")
        record(res, time.time() - start)
        if res.oom:  # out of memory (device or host): this style's sweep ends here
            return
        if not res.ok and (res.error or "").startswith("timeout"):
            blocked.append((seq, _layer_key(layers)))


def summary_line(res: runner.RunResult, wall: float) -> str:
    def num(v, spec):
        return "-" if v is None else format(v, spec)

    if res.ok and res.kind == "estimate":
        return (f"{res.spec.label():40s} est  peak {num(res.est_peak_gib, '8.2f')} GiB  host "
                f"{num(res.est_host_gib, '8.2f')} GiB  ({wall:.0f} s)")
    if res.ok:
        return (f"{res.spec.label():40s} ok   reserved {num(res.reserved_gib, '8.2f')} GiB  active "
                f"{num(res.active_gib, '8.2f')} GiB  step {num(res.step_s, '9.3f')} s  "
                f"tps {num(res.tps, '10.1f')}  ({wall:.0f} s)")
    why = f"OOM ({res.oom_kind})" if res.oom else (res.error or "failed").strip().splitlines()[-1][:120]
    return f"{res.spec.label():40s} FAIL {why}  ({wall:.0f} s)"


def dry_run(args, extra: list[str]) -> int:
    """Every run of the sweep, checked by :func:`.runner.check_command` and printed; 1 if any
    is invalid (each is reported)."""
    bad = 0
    for style in args.styles:
        for seq, layers in _grid(args):
            spec = _spec(args, extra, style, seq, layers)
            try:
                runner.check_command(spec)
            except Exception as e:  # noqa: BLE001 - reported, and the sweep fails
                bad += 1
                print(f"INVALID {spec.label()}: {type(e).__name__}: {e}", flush=True)
                continue
            print(f"ok {spec.label()}: {_shown(spec, args.estimate)}", flush=True)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="arguments after -- are passed to train.py")
    ap.add_argument("--config", required=True, help="train_configs/*.toml")
    ap.add_argument("--ngpu", type=int, help="ranks of the simulated job (default: the config's CP degree)")
    ap.add_argument("--styles", nargs="+", type=parse_style, default=[{"style": None}])
    ap.add_argument("--seq-lens", nargs="+", type=parse_len, required=True)
    ap.add_argument("--layers", nargs="+", type=int, default=[0], help="layer counts; 0 = all")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the time median")
    ap.add_argument("--out", required=True, help="JSON file (docs/results/NAME.json)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    ap.add_argument("--estimate", action="store_true",
                    help="run the CPU memory estimator (fake tensors, no GPU) instead of training")
    ap.add_argument("--dry-run", action="store_true",
                    help="parse and validate every run's train.py options for the N-rank CUDA "
                    "job and print its command; run nothing")
    ap.add_argument("--jobs", type=int, default=1,
                    help="styles measured concurrently (1 on a GPU: runs must not share it)")
    args = ap.parse_args(own)
    if args.ngpu is None:
        args.ngpu = config_cp_degree(args.config)
    for style in args.styles:
        if not 0 <= style.get("rank", 0) < args.ngpu:
            ap.error(f"--styles: rank r={style['rank']} is not a rank of the {args.ngpu}-rank "
                     f"job; valid: 0 to {args.ngpu - 1}")
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup (the time is the median of the steps after it)")

    if args.dry_run:
        return dry_run(args, extra)

    results: list[runner.RunResult] = []
    lock = threading.Lock()
    cmdline = ["python", "scripts/bench_one_rank.py", *argv]

    def record(res: runner.RunResult, wall: float) -> None:
        with lock:
            results.append(res)
            print(summary_line(res, wall), flush=True)
            runner.save(results, args.out, cmdline)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for fut in [pool.submit(sweep, st, args, extra, record) for st in args.styles]:
            fut.result()
    runner.save(results, args.out, cmdline)
    n_ok = sum(r.ok for r in results)
    print(f"{n_ok}/{len(results)} runs ok -> {args.out}", flush=True)
    return 0 if n_ok else 1


if __name__ == "__main__":
    sys.exit(main())
