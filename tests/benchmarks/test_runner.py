"""The one-rank runner: train.py as rank R of an N-rank job, and what it records."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from benchmarks import runner
from tests.helpers.bench_data import CONFIG_8B, M
from tests.helpers.paths import ROOT


@pytest.mark.slow
def test_train_py_on_the_fake_backend_is_the_chosen_rank(tmp_path):
    """``benchmark.fake_rank``: train.py really is rank 3 of the 4-rank job (TorchTitan names
    the TensorBoard folder by ``dist.get_rank()``), and the runner reads its scalars."""
    spec = runner.RunSpec("train_configs/llama3_debug_upipe.toml", 4, 512, n_layers=1, style="usp",
                          chunk_heads=0, ulysses_degree=1, steps=3, warmup=1, rank=3,
                          extra=["--parallelism.context_parallel_degree", "4"])
    env = dict(os.environ, NGPU="4", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(runner.command(spec, str(tmp_path)), env=env, check=False,
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = [os.path.basename(p) for p in (tmp_path / "tb").glob("*/*")]
    assert folders == ["rank_3"]
    got = runner.summarize(runner._scalars(str(tmp_path)), spec.warmup)
    assert got["step_s"] > 0 and got["tps"] > 0 and got["reserved_gib"] > 0


def test_recorded_commands_name_no_machine_paths(tmp_path):
    """Results JSON is committed: commands say ``python`` and paths relative to the checkout."""
    spec = runner.RunSpec(CONFIG_8B, 8, 4 * M, style="upipe", chunk_heads=8)
    for cmd in (runner.command(spec, str(tmp_path)), runner.estimate_command(spec, "$DUMP", "$OUT")):
        shown = runner.shown_command(cmd)
        assert shown.startswith("python ") and sys.executable not in shown and ROOT not in shown
    assert runner.shown_command(runner.command(spec, "$DUMP")).split()[1] == "train.py"
    assert runner.environment()["python"] == ".".join(map(str, sys.version_info[:3]))


@pytest.mark.parametrize("returncode,text,kind", [
    (1, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "device"),
    (1, "RuntimeError: cuDNN error: CUDNN_STATUS_ALLOC_FAILED", "device"),
    (1, "CUDA driver error: CUDA_ERROR_OUT_OF_MEMORY", "device"),
    (1, "RuntimeError: cudaHostRegister failed: out of memory", "host"),
    (1, "RuntimeError: CachingHostAllocator: allocation of 8 GiB failed", "host"),
    (-9, "", "host"),  # killed by the kernel's OOM killer: no Python error at all
    (137, "step:  1", "host"),
    (-9, "Traceback (most recent call last):\n  ValueError: bad option", None),
    (1, "Traceback (most recent call last):\n  ValueError: bad option", None),
])
def test_failures_are_classified_as_device_or_host_out_of_memory(returncode, text, kind):
    assert runner.classify_failure(returncode, text) == kind


def test_the_device_cap_and_the_allocator_retries_are_recorded():
    spec = runner.RunSpec(CONFIG_8B, 8, 4 * M)
    assert runner.device_cap_gib(spec) == 80.0  # the H100 configs' cap
    assert runner.device_cap_gib(runner.RunSpec(CONFIG_8B, 8, M, extra=[
        "--benchmark.device_memory_gib", "40"])) == 40.0
    assert runner.device_cap_gib(runner.RunSpec("train_configs/llama3_debug_upipe.toml", 2, 512)) is None
    scalars = {"reserved_gib": {1: 5.0, 2: 6.0}, "active_gib": {1: 4.0, 2: 4.5},
               "alloc_retries": {1: 0.0, 2: 3.0}, "step_s": {1: 9.0, 2: 1.0, 3: 2.0},
               "tps": {1: 1.0, 2: 10.0, 3: 20.0}}
    got = runner.summarize(scalars, warmup=1)
    assert got == {"reserved_gib": 6.0, "active_gib": 4.5, "alloc_retries": 3.0, "step_s": 1.5,
                   "tps": 15.0}


def test_a_failed_page_lock_of_the_offload_buffers_reads_as_a_host_oom():
    """The error :class:`~torchtitan_upipe.memory.HostMemory` raises when cudaHostRegister fails
    (here with the runtime's cudaErrorMemoryAllocation, 2) stops a sweep as a host OOM."""
    from torchtitan_upipe.memory import host

    def fail(ptr, nbytes):
        host._check_register(2, nbytes)

    memory = host.HostMemory(pinned=True, register=fail, unregister=lambda ptr: None)
    with pytest.raises(RuntimeError) as err:
        memory.empty((4,), torch.float32)
    assert "memory.offload_pinned = false" in str(err.value)
    assert runner.classify_failure(1, f"RuntimeError: {err.value}") == "host"


def test_the_saved_command_names_no_machine_path(tmp_path):
    import json

    out = tmp_path / "deep" / "result.json"
    runner.save([], str(out), ["scripts/bench_one_rank.py", "--estimate", "--out", str(out)])
    command = json.loads(out.read_text())["command"]
    assert command == "scripts/bench_one_rank.py --estimate --out result.json"
