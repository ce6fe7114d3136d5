"""Run one rank of an N-GPU job for real with TorchTitan's fake process group, and read it back.

``python train.py --comm.mode fake_backend`` with ``NGPU=N`` builds rank 0 (or
``benchmark.fake_rank``) of an ``N``-rank job: real kernels, real activations, real FSDP
shards and all-gather buffers, but collectives are no-ops (their time and NCCL's buffers are
not measured).  Each run's per-step TensorBoard scalars give the peak memory TorchTitan's
monitor reads from the caching allocator, the step time and TorchTitan's tokens/s per GPU
(``tps``: tokens / (time * non-data-parallel size), the paper's unit).  The step time is
compute only; :mod:`torchtitan_upipe.tools.perf_model.comm` adds communication.

Commands are recorded as a user would type them: ``python`` for the interpreter, ``$DUMP``
and ``$OUT`` for the temporary folders, no machine paths.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from dataclasses import replace as dataclass_replace

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TAGS = {
    "reserved_gib": "memory/max_reserved(GiB)",
    "active_gib": "memory/max_active(GiB)",
    "alloc_retries": "memory/num_alloc_retries",
    "step_s": "time_metrics/end_to_end(s)",
    "tps": "throughput(tps)",
}


@dataclass
class RunSpec:
    config: str
    ngpu: int
    seq_len: int
    n_layers: int = 0
    style: str | None = None
    chunk_heads: int | None = None
    ulysses_degree: int | None = None
    steps: int = 6
    warmup: int = 2
    extra: list[str] = field(default_factory=list)
    rank: int = 0  # the simulated rank of the job (benchmark.fake_rank); ring ranks differ

    def label(self) -> str:
        style = self.style or "config"
        if self.chunk_heads:
            style += f"(U={self.chunk_heads})"
        if self.rank:
            style += f" rank {self.rank}"
        return f"{style} S={self.seq_len} L={self.n_layers or 'all'}"


@dataclass
class RunResult:
    spec: RunSpec
    command: str
    ok: bool
    oom: bool
    reserved_gib: float | None = None
    active_gib: float | None = None
    step_s: float | None = None
    tps: float | None = None
    error: str | None = None
    kind: str = "measured"  # or "estimate": the CPU estimator's prediction (no GPU)
    est_peak_gib: float | None = None   # estimate: peak allocated (+ kernel workspaces)
    est_host_gib: float | None = None   # estimate: host buffers of offloaded activations
    oom_kind: str | None = None  # "device" or "host" when ``oom`` (see :func:`classify_failure`)
    alloc_retries: float | None = None  # the caching allocator's retries (TorchTitan's counter)
    device_cap_gib: float | None = None  # benchmark.device_memory_gib the run was capped to


def command(spec: RunSpec, dump_folder: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "train.py"), "--comm.mode", "fake_backend",
            *train_args(spec, dump_folder)]


def estimate_command(spec: RunSpec, dump_folder: str, json_path: str) -> list[str]:
    """The CPU memory estimator (:mod:`torchtitan_upipe.tools.estimate`) on the run's options."""
    return [sys.executable, "-m", "torchtitan_upipe.tools.estimate", "--ngpu", str(spec.ngpu),
            "--out", json_path, *train_args(spec, dump_folder)]


def train_args(spec: RunSpec, dump_folder: str) -> list[str]:
    cmd = [
        "--job.config_file", spec.config,
        "--training.seq_len", str(spec.seq_len),
        "--training.steps", str(spec.steps),
        "--benchmark.n_layers", str(spec.n_layers),
        "--metrics.log_freq", "1",
        "--metrics.enable_tensorboard",
        "--job.dump_folder", dump_folder,
    ]
    if spec.style:
        cmd += ["--context_parallel.style", spec.style]
    if spec.chunk_heads is not None:
        cmd += ["--context_parallel.upipe_chunk_heads", str(spec.chunk_heads)]
    if spec.ulysses_degree is not None:
        cmd += ["--context_parallel.ulysses_degree", str(spec.ulysses_degree)]
    if spec.rank:
        # TorchTitan writes TensorBoard on rank 0 only, unless every rank saves its own
        cmd += ["--benchmark.fake_rank", str(spec.rank), "--metrics.save_for_all_ranks"]
    return cmd + list(spec.extra)


def check_command(spec: RunSpec) -> None:
    """Parse a run's train.py options as train.py would and validate them for its ``N``-rank
    CUDA job, without running anything (``--dry-run``): a bad option raises here, on CPU,
    with the message the GPU run would have printed."""
    from torchtitan.config import ConfigManager

    import torchtitan_upipe.train_spec  # noqa: F401 - registers upipe_llama3
    from torchtitan_upipe.titan.checks import validate_job_config

    config = spec.config if os.path.isabs(spec.config) else os.path.join(ROOT, spec.config)
    args = ["--comm.mode", "fake_backend", *train_args(dataclass_replace(spec, config=config), "$DUMP")]
    validate_job_config(ConfigManager().parse_args(args), world_size=spec.ngpu, cuda=True)


def _scalars(dump_folder: str) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {k: {} for k in TAGS}
    for path in glob.glob(os.path.join(dump_folder, "tb", "**", "events.out.tfevents.*"), recursive=True):
        acc = EventAccumulator(path)
        acc.Reload()
        tags = acc.Tags()["scalars"]
        for key, tag in TAGS.items():
            if tag in tags:
                out[key].update({ev.step: ev.value for ev in acc.Scalars(tag)})
    return out


def summarize(scalars: dict[str, dict[int, float]], warmup: int) -> dict[str, float | None]:
    """Peak memory over all steps; median step time and tps over the steps after ``warmup``."""
    res: dict[str, float | None] = {}
    for key in ("reserved_gib", "active_gib", "alloc_retries"):
        vals = list(scalars[key].values())
        res[key] = max(vals) if vals else None
    for key in ("step_s", "tps"):
        vals = [v for s, v in sorted(scalars[key].items()) if s > warmup]
        res[key] = statistics.median(vals) if vals else None
    return res


def run(spec: RunSpec, timeout: int = 3600) -> RunResult:
    with tempfile.TemporaryDirectory(prefix="upipe_bench_") as dump:
        cmd = command(spec, dump)
        env = dict(os.environ, NGPU=str(spec.ngpu), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                   PYTHONUNBUFFERED="1")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        text = proc.stdout + proc.stderr
        shown = f"NGPU={spec.ngpu} " + shown_command(cmd).replace(dump, "$DUMP")
        cap = device_cap_gib(spec)
        if proc.returncode != 0:
            kind = classify_failure(proc.returncode, text)
            return RunResult(spec, shown, ok=False, oom=kind is not None, oom_kind=kind,
                             error=text[-3000:] or f"exit status {proc.returncode}",
                             device_cap_gib=cap)
        return RunResult(spec, shown, ok=True, oom=False, device_cap_gib=cap,
                         **summarize(_scalars(dump), spec.warmup))


def estimate(spec: RunSpec, timeout: int = 3600) -> RunResult:
    """The CPU estimator's prediction for ``spec`` (fake tensors; see
    :mod:`torchtitan_upipe.tools.estimate`)."""
    with tempfile.TemporaryDirectory(prefix="upipe_est_") as dump:
        path = os.path.join(dump, "estimate.json")
        cmd = estimate_command(spec, dump, path)
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        shown = shown_command(cmd).replace(path, "$OUT").replace(dump, "$DUMP")
        if proc.returncode != 0:
            return RunResult(spec, shown, ok=False, oom=False, kind="estimate",
                             error=(proc.stdout + proc.stderr)[-3000:])
        with open(path) as f:
            est = json.load(f)
        return RunResult(spec, shown, ok=True, oom=False, kind="estimate",
                         est_peak_gib=est["peak_gib"], est_host_gib=est["host_gib"])


_DEVICE_OOM = ("OutOfMemoryError", "CUDA out of memory", "CUDA_ERROR_OUT_OF_MEMORY",
               "cudaErrorMemoryAllocation", "CUBLAS_STATUS_ALLOC_FAILED",
               "CUDNN_STATUS_ALLOC_FAILED", "CUDNN_BACKEND_API_FAILED: out of memory")
_HOST_OOM = ("cudaHostRegister", "cudaHostAlloc", "CachingHostAllocator", "std::bad_alloc",
             "Cannot allocate memory", "MemoryError")


def classify_failure(returncode: int, text: str) -> str | None:
    """``"device"``, ``"host"`` or ``None``: whether a failed run ran out of memory, and which.

    Device: torch's ``OutOfMemoryError`` and the CUDA, cuBLAS and cuDNN allocation failures.
    Host: a failed pinned (page-locked) or pageable host allocation, or the kernel's OOM killer
    (``SIGKILL``: exit status -9 or 137) leaving no Python error behind."""
    if any(m in text for m in _DEVICE_OOM):
        return "device"
    if any(m in text for m in _HOST_OOM):
        return "host"
    if returncode in (-9, 137) and "Traceback" not in text:
        return "host"
    return None


def device_cap_gib(spec: RunSpec) -> float | None:
    """The ``benchmark.device_memory_gib`` a run was capped to (its config's, or an override)."""
    words = list(spec.extra)
    for i, w in enumerate(words):
        if w.startswith("--benchmark.device_memory_gib"):
            value = w.split("=", 1)[1] if "=" in w else words[i + 1]
            return float(value) or None
    with open(spec.config if os.path.isabs(spec.config) else os.path.join(ROOT, spec.config), "rb") as f:
        value = tomllib.load(f).get("benchmark", {}).get("device_memory_gib", 0)
    return float(value) or None


def shown_command(cmd: list[str]) -> str:
    """``cmd`` as recorded: ``python`` for this interpreter, the checkout's paths relative."""
    words = ["python" if c == sys.executable else os.path.relpath(c, ROOT) if c.startswith(ROOT + os.sep)
             else c for c in cmd]
    return " ".join(shlex.quote(c) for c in words)


def environment() -> dict[str, str]:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else (platform.processor() or "cpu")
    return {"device": dev, "torch": torch.__version__, "python": platform.python_version(),
            "host": platform.node()}


def _without_paths(argv: list[str]) -> list[str]:
    """``argv`` with the output file named by its base name only (no machine paths)."""
    return [os.path.basename(a) if i and argv[i - 1] == "--out" else a
            for i, a in enumerate(argv)]


def save(results: list[RunResult], path: str, argv: list[str]) -> None:
    data = {
        "environment": environment(),
        "command": " ".join(shlex.quote(a) for a in _without_paths(argv)),
        "runs": [dict(asdict(r), label=r.spec.label()) for r in results],
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
