"""The planner: does a job fit, the longest context that fits, the fastest configuration.

    python -m torchtitan_upipe.tools.plan --gpus N [--gpu h100|h200|a100|b200 | --device-gib G]
        [--host-gib H] [--gpus-per-node 8] [--reserve-gib 4] [--host-reserve-gib 64]
        [--pinned-gib P] [--mfu 0.5]
        [--max-context] [--no-confirm | --confirm-layers L] [--json] [--png PATH]
        --job.config_file train_configs/<name>.toml [any train.py option]

It reads the job as train.py does (TorchTitan's ``ConfigManager``; the config's CP degree,
model, batch, precision and ``[memory]`` options) and answers, per row (a style and its
all-to-all degree ``u``; UPipe's ``U`` is chosen within the row):

* at the config's ``training.seq_len``: whether the row fits the device and the host, its
  predicted peak and host memory, its fastest configuration that fits (``U``; offload with
  the most layers kept on the device, prefetch, pinned or pageable host buffers
  (``--pinned-gib``), the tiles and the chunked loss) and that
  configuration's predicted tokens/s per GPU (:mod:`.speed`); then the fastest of all, as a
  ``torchrun ... train.py`` command line;
* with ``--max-context``: the longest ``seq_len`` per row (bisected in steps of 1024 tokens
  times what the layout needs, not a fixed grid), with the fastest configuration there.

The search uses the analytic memory model (:mod:`...titan.memory_model`, through
:mod:`...titan.fitting`); the final answer is confirmed with the CPU fake-tensor estimator
(:mod:`..estimate`, the real training code on fake tensors), at its first
``--confirm-layers`` layers (4; 0 = full depth, minutes to hours on CPU: the estimator's
time grows with layers x UPipe stages x ring steps) against the model at the same depth,
both printed with their difference; ``--no-confirm`` skips it.  Every figure is a prediction
per rank (host also per node) and labelled so; nothing here is measured on a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

from ...titan import fitting as fm
from ...titan.config import ConfigError
from .search import Candidate, Job, fastest, max_context, plan_length
from .speed import Hardware

GiB = fm.GiB


def parse(argv: list[str]):
    ap = argparse.ArgumentParser(
        prog="python -m torchtitan_upipe.tools.plan",
        description="Plan a run: what fits, the longest context, the fastest configuration "
        "(predicted from the analytic memory model; confirmed on CPU by the estimator)",
        epilog="All other options are train.py's (TorchTitan's), e.g. --job.config_file and "
        "--training.seq_len.")
    ap.add_argument("--gpus", type=int, required=True, help="GPUs in the job (the world size)")
    ap.add_argument("--gpu", default="h100", help=f"GPU model: one of {sorted(fm.GPUS)} "
                    "(memory, peak FLOP/s, host memory of its 8-GPU system); default h100")
    ap.add_argument("--device-gib", type=float, default=None,
                    help="device memory per GPU in GiB (default: the --gpu's)")
    ap.add_argument("--host-gib", type=float, default=None,
                    help="host memory per node in GiB (default: the --gpu's 8-GPU system)")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--reserve-gib", type=float, default=fm.DEFAULT_RESERVE_GIB,
                    help="device memory per GPU kept free of the predicted peak (default 4)")
    ap.add_argument("--host-reserve-gib", type=float, default=64.0,
                    help="host memory per node kept for everything but offloaded activations "
                    "(processes, data loading, the OS); default 64")
    ap.add_argument("--pinned-gib", type=float, default=None,
                    help="host memory per node that may be page-locked (default: all); "
                    "offloaded inputs above it are planned in pageable buffers "
                    "(memory.offload_pinned = false: slower, synchronous copies)")
    ap.add_argument("--mfu", type=float, default=0.5,
                    help="assumed fraction of the GPU's dense bf16 peak the step achieves")
    ap.add_argument("--max-context", action="store_true",
                    help="search the longest context per style instead of planning seq_len")
    ap.add_argument("--no-confirm", dest="confirm", action="store_false",
                    help="skip the CPU estimator's confirmation of the final answer")
    ap.add_argument("--confirm-layers", type=int, default=4, metavar="L",
                    help="confirm at the first L layers (the model at the same depth; the "
                    "estimator's time grows with layers x stages x ring steps); 0 = full "
                    "depth; default 4")
    ap.add_argument("--json", action="store_true", help="print JSON instead of text")
    ap.add_argument("--png", default=None,
                    help="also plot predicted peak memory vs length per style to this PNG")
    ours, rest = ap.parse_known_args(argv)
    if ours.gpus < 1:
        ap.error(f"--gpus must be >= 1, got {ours.gpus}")
    if ours.gpus_per_node < 1:
        ap.error(f"--gpus-per-node must be >= 1, got {ours.gpus_per_node}")
    if ours.confirm_layers < 0:
        ap.error(f"--confirm-layers must be >= 0 (0 = full depth), got {ours.confirm_layers}")
    if not 0 < ours.mfu <= 1:
        ap.error(f"--mfu must be in (0, 1], got {ours.mfu}")
    if not any(a.split("=")[0] in ("--job.config_file", "--job.config-file") for a in rest):
        ap.error("give the job as train.py takes it: --job.config_file train_configs/<name>.toml")
    return ours, rest


def build_job(ours, rest: list[str]) -> Job:
    from ...titan.cpu_compat import cpu_compat

    with cpu_compat():
        import torchtitan_upipe.train_spec  # noqa: F401  (registers upipe_llama3)

        from ...titan.checks import model_args
        from ...titan.console import parse_args

        job_config = parse_args(list(rest))
        args = model_args(job_config)
    gpu = fm.get_gpu(ours.gpu)
    device_gib = gpu.memory_gib if ours.device_gib is None else ours.device_gib
    cap = job_config.benchmark.device_memory_gib
    if cap and cap < device_gib:  # train.py will cap the device there: plan for the cap
        device_gib = cap
    host_gib = gpu.node_host_gib if ours.host_gib is None else ours.host_gib
    if ours.host_gib is not None and ours.host_gib <= 0:
        raise ConfigError(f"--host-gib must be > 0 GiB per node, got {ours.host_gib}")
    budget = fm.Budget(device_gib, ours.reserve_gib, host_gib, ours.host_reserve_gib,
                       min(ours.gpus, ours.gpus_per_node))
    if ours.pinned_gib is not None and ours.pinned_gib < 0:
        raise ConfigError(f"--pinned-gib must be >= 0 GiB per node, got {ours.pinned_gib}")
    job = Job(job_config, ours.gpus, budget, Hardware(gpu, ours.mfu), args, ours.pinned_gib)
    _check_model_states(job)
    return job


def _check_model_states(job: Job) -> None:
    """Refuse a device too small for the sharded model states alone (fp32 params and Adam's
    two moments over the FSDP ranks): no activation option helps then."""
    from ...titan import memory_model as mm

    st = job.base
    states = mm.model_states_bytes(st)
    if states > job.budget.device_limit:
        raise ConfigError(
            f"the model states alone (fp32 parameters and Adam moments, sharded over "
            f"{st.world} GPUs, plus the gathered last block and output layer) need "
            f"{fm.gib(states)} GiB per GPU, more than the {fm.gib(job.budget.device_limit)} "
            f"GiB the device leaves after the reserve; use more GPUs or larger ones")


# ------------------------------------------------------------------------------ answers
def train_args(rest: list[str], options: dict[str, object]) -> list[str]:
    """``rest`` (train.py's arguments) with ``options`` set: their earlier occurrences
    (``--k v``, ``--k=v``, ``--k``/``--section.no_k`` flags) removed, then appended."""
    keys = {k.replace("-", "_"): isinstance(v, bool) for k, v in options.items()}

    def key_of(token: str) -> str | None:
        if not token.startswith("--"):
            return None
        name = token[2:].split("=")[0].replace("-", "_")
        section, _, field = name.rpartition(".")
        if name in keys:
            return name
        if field.startswith("no_") and f"{section}.{field[3:]}" in keys:
            return f"{section}.{field[3:]}"
        return None

    out, i = [], 0
    while i < len(rest):
        tok = rest[i]
        key = key_of(tok)
        if key is None:
            out.append(tok)
            i += 1
            continue
        takes_value = "=" not in tok and not keys[key]
        i += 2 if takes_value else 1
    return out + fm.option_args(options)


def command(ours, rest: list[str], cand: Candidate, job: Job) -> str:
    nodes = -(-ours.gpus // ours.gpus_per_node)
    per_node = min(ours.gpus, ours.gpus_per_node)
    launch = f"torchrun --nproc_per_node {per_node}"
    if nodes > 1:
        launch += f" --nnodes {nodes} --rdzv_backend c10d --rdzv_endpoint $HEAD_NODE:29500"
    return " ".join([launch, "train.py", *train_args(rest, cand.options(job))])


def worst_rank(cand: Candidate) -> int:
    """The rank the estimator simulates: the last of a causal ring (it merges the most);
    every rank of an all-to-all is alike."""
    st = cand.setup
    return (st.ring - 1) * st.u


def candidate_json(cand: Candidate | None, job: Job, ours, rest) -> dict | None:
    if cand is None:
        return None
    f, p = cand.fit, cand.prediction
    return {
        "layout": cand.layout.label(job.cp), "style": cand.layout.style,
        "ulysses_degree": cand.layout.ulysses, "chunk_heads": cand.layout.chunk_heads,
        "seq_len": cand.setup.seq_len,
        "options": cand.options(job), "fits": f.ok, "device_ok": f.device_ok,
        "host_ok": f.host_ok, "peak_gib": f.peak / GiB, "host_rank_gib": f.host_rank / GiB,
        "host_node_gib": f.host_node / GiB, "peak_at": fm.where_text(f.where),
        "pinned": cand.pinned if cand.setup.offload else None,
        "predicted_step_s": p.step_s, "predicted_tps": p.tps, "predicted_compute_s": p.compute_s,
        "predicted_merge_s": p.merge_s, "predicted_comm_s": p.comm_s,
        "predicted_offload_s": p.offload_s,
        "command": command(ours, rest, cand, job),
    }


def confirm(cand: Candidate, job: Job, ours, rest) -> dict:
    """The CPU estimator on the chosen configuration (its worst rank): the real training code
    on fake tensors, two steps, at ``--confirm-layers`` layers, against the model at the same
    depth."""
    from ...titan import memory_model as mm
    from ..estimate import estimate_memory

    layers = min(ours.confirm_layers or cand.setup.n_layers, cand.setup.n_layers)
    argv = train_args(rest, cand.options(job))
    if layers < cand.setup.n_layers:
        shallow = {"benchmark.n_layers": layers}
        if cand.setup.offload and cand.setup.keep_layers > layers:  # all kept at this depth
            shallow["memory.offload_keep_layers"] = layers
        argv = train_args(argv, shallow)
    with tempfile.TemporaryDirectory() as dump:
        est = estimate_memory([*argv, "--job.dump_folder", dump], ours.gpus, steps=2,
                              target="cuda", rank=worst_rank(cand))
    model = fm.fit(mm.replace(cand.setup, n_layers=layers), job.budget)
    return {"n_layers": layers, "estimate_gib": est.peak_bytes / GiB,
            "model_gib": model.peak / GiB, "model_over_estimate": model.peak / est.peak_bytes - 1,
            "estimate_host_gib": est.host_bytes / GiB, "model_host_gib": model.host_rank / GiB,
            "seconds": est.seconds, "rank": est.rank,
            "command": "python -m torchtitan_upipe.tools.estimate --ngpu "
                       f"{ours.gpus} --rank {est.rank} " + " ".join(argv)}


def run(ours, rest: list[str]) -> dict:
    job = build_job(ours, rest)
    b = job.budget
    cap = job.job_config.benchmark.device_memory_gib
    out = {
        "device_cap": (f"benchmark.device_memory_gib={cap:g} caps each GPU (train.py caps it "
                       f"too); give --benchmark.device_memory_gib 0 to plan for the whole GPU")
        if cap and cap == b.device_gib else None,
        "predicted": "analytic memory model per rank; step time from an assumed "
                     f"{ours.mfu:g} of the GPU's dense bf16 peak + the communication model; "
                     "not measured",
        "gpus": ours.gpus, "gpu": job.hardware.gpu.name, "device_gib": b.device_gib,
        "reserve_gib": b.reserve_gib, "host_gib_per_node": b.host_gib,
        "host_reserve_gib": b.host_reserve_gib, "ranks_per_node": b.ranks_per_node,
        "model": f"{job.job_config.model.name}/{job.job_config.model.flavor}",
        "n_layers": job.base.n_layers, "cp_degree": job.cp,
        "refused": job.refused,
    }
    if ours.max_context:
        found = max_context(job)
        out["max_context"] = [{"row": m.row, "seq_len": m.seq_len,
                               "at": candidate_json(m.at, job, ours, rest)} for m in found]
        best = max((m for m in found if m.at is not None), key=lambda m: m.seq_len, default=None)
        final = best.at if best else None
    else:
        out["seq_len"] = job.base.seq_len
        rows = plan_length(job, job.base.seq_len)
        out["rows"] = [{"row": r.row, "fits": r.fits,
                        "best": candidate_json(r.best, job, ours, rest),
                        "leanest": candidate_json(r.leanest, job, ours, rest)} for r in rows]
        final = fastest(rows)
    out["answer"] = candidate_json(final, job, ours, rest)
    if final is not None and ours.confirm:
        out["confirm"] = confirm(final, job, ours, rest)
    if ours.png:
        from .plot import plot_peaks

        plot_peaks(job, ours.png)
        out["png"] = ours.png
    return out


# --------------------------------------------------------------------------------- text
def _cand_line(c: dict | None) -> str:
    if c is None:
        return "-"
    opts = fm.format_options({k: v for k, v in c["options"].items()
                              if not k.startswith("context_parallel.style")
                              and k != "context_parallel.ulysses_degree"})
    return (f"{c['layout']}: peak {c['peak_gib']:.1f} GiB at {c['peak_at']}, host "
            f"{c['host_node_gib']:.0f} GiB/node, {c['predicted_tps']:.0f} tokens/s/GPU "
            f"(predicted){'  ' + opts if opts else ''}")


def text(out: dict) -> str:
    lines = [f"{out['model']} ({out['n_layers']} layers) on {out['gpus']} x {out['gpu']}: "
             f"{out['device_gib']:g} GiB per GPU less a {out['reserve_gib']:g} GiB reserve; host "
             f"{out['host_gib_per_node']:g} GiB per node of {out['ranks_per_node']} GPUs less "
             f"{out['host_reserve_gib']:g}; CP degree {out['cp_degree']}",
             f"All figures predicted ({out['predicted']})."]
    if out["device_cap"]:
        lines.append(f"Note: {out['device_cap']}.")
    lines.append("")
    if "max_context" in out:
        lines.append("Longest context per style (bisected), and the fastest configuration there:")
        for m in out["max_context"]:
            lines.append(f"  {m['row']:12s} {m['seq_len']:>10d} tokens ({m['seq_len'] / 2**20:.2f}M)"
                         f"  {_cand_line(m['at'])}")
    else:
        lines.append(f"training.seq_len = {out['seq_len']} ({out['seq_len'] / 2**20:.2f}M):")
        for r in out["rows"]:
            if r["fits"]:
                lines.append(f"  {r['row']:12s} fits          {_cand_line(r['best'])}")
            else:
                ln = r["leanest"]
                why = [w for w, ok in (("device", ln["device_ok"]), ("host", ln["host_ok"]))
                       if not ok] or ["kernel: FlashAttention-2's 32-bit offset limit"]
                lines.append(f"  {r['row']:12s} does not fit  (leanest options: peak "
                             f"{ln['peak_gib']:.1f} GiB, host {ln['host_node_gib']:.0f} GiB/node; "
                             f"over: {', '.join(why)})")
    for row, why in out["refused"].items():
        lines.append(f"  {row:12s} refused by the config checks: {why}")
    ans = out["answer"]
    lines.append("")
    if ans is None:
        lines.append("Nothing fits. Use more GPUs, larger ones, or a shorter training.seq_len.")
    else:
        lines += [f"Fastest that fits: {_cand_line(ans)}", f"  {ans['command']}"]
    if "confirm" in out:
        c = out["confirm"]
        depth = ("full depth" if c["n_layers"] == out["n_layers"]
                 else f"the first {c['n_layers']} layers")
        lines.append(f"Checked by the CPU estimator at {depth} (rank {c['rank']}, "
                     f"{c['seconds']:.0f} s): {c['estimate_gib']:.2f} GiB, the model "
                     f"{c['model_gib']:.2f} GiB ({100 * c['model_over_estimate']:+.1f}%); host "
                     f"{c['estimate_host_gib']:.1f} GiB per rank (model "
                     f"{c['model_host_gib']:.1f})")
        lines.append(f"  {c['command']}")
    if out.get("png"):
        lines.append(f"Plot: {out['png']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The planner's command line; a user error is one line on stderr and exit code 2."""
    from ...titan.console import user_errors

    ours, rest = parse(sys.argv[1:] if argv is None else argv)
    try:
        with user_errors("python -m torchtitan_upipe.tools.plan"):
            out = run(ours, rest)
    except SystemExit as e:
        return e.code
    print(json.dumps(out, indent=1) if ours.json else text(out))
    return 0 if out["answer"] is not None else 1


__all__ = ["command", "confirm", "main", "run", "text", "train_args", "worst_rank"]
