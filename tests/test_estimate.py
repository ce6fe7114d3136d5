"""The CPU memory estimator (torchtitan_upipe.estimate) and the tracker it counts with.

The estimator runs rank 0 of an N-rank job under ``FakeTensorMode``.  Its ``--real`` mode runs
the very same steps with real tensors, so on small shapes the fake estimate must equal the
real-tensor measurement byte for byte: that is what shows fake tensors lose nothing (custom
ops, DTensor parameters, FSDP buffers, offloaded host buffers).  Against the GPU the error is
measured by the benchmark (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.dist_harness import run_distributed
from torchtitan_upipe.memtrack import LiveTensorTracker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG = os.path.join(ROOT, "train_configs", "llama3_debug_upipe.toml")
DEBUG_STACK = os.path.join(ROOT, "train_configs", "llama3_debug_upipe_memory.toml")


def _estimate(tmp_path, ngpu: int, *args: str, real: bool = False, check: bool = True):
    out = tmp_path / f"est_{'real' if real else 'fake'}.json"
    cmd = [sys.executable, "-m", "torchtitan_upipe.estimate", "--ngpu", str(ngpu),
           "--target", "cpu", "--json", str(out), *args] + (["--real"] if real else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    if not check:
        return proc
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


KEYS = ("init_bytes", "train_peak_bytes", "optim_peak_bytes", "host_bytes", "peak_bytes")

CASES = {
    "upipe_stack_c4": (4, DEBUG_STACK, "--parallelism.context_parallel_degree", "4",
                       "--training.seq_len", "2048"),
    "upipe_u4": (2, DEBUG, "--context_parallel.upipe_chunk_heads", "4"),
    "ulysses_ac": (2, DEBUG, "--context_parallel.style", "ulysses",
                   "--activation_checkpoint.mode", "full"),
    "usp_2x2_fsdp2": (8, DEBUG_STACK, "--context_parallel.style", "usp",
                      "--context_parallel.ulysses_degree", "2",
                      "--parallelism.context_parallel_degree", "4",
                      "--parallelism.data_parallel_shard_degree", "2",
                      "--training.seq_len", "1024"),
    "upipe_ring_2x2": (4, DEBUG_STACK, "--context_parallel.ulysses_degree", "2",
                       "--parallelism.context_parallel_degree", "4",
                       "--training.seq_len", "1024"),
}


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=[] if c == "upipe_stack_c4" else [pytest.mark.slow]) for c in CASES],
)
def test_fake_estimate_equals_real_tensor_measurement(tmp_path, case):
    ngpu, *args = CASES[case]
    fake = _estimate(tmp_path, ngpu, "--job.config_file", *args)
    real = _estimate(tmp_path, ngpu, "--job.config_file", *args, real=True)
    assert fake["fake"] and not real["fake"]
    for key in KEYS:
        assert fake[key] == real[key], key
    # the step holds more than the initialized model, and step 2 also holds the Adam state
    assert fake["train_peak_bytes"][1] > fake["train_peak_bytes"][0] > fake["init_bytes"] > 0


def test_estimate_host_bytes_and_memory_model(tmp_path):
    """Offloaded inputs are host memory, exactly (L - keep) x (b, S/C, dim) x 4 bytes; the
    device peak agrees with the analytic model (memory_model.py), an independent derivation,
    to within 5% (the model approximates FSDP's buffers for bf16 training, this is fp32)."""
    from torchtitan_upipe import memory_model as mm
    from torchtitan_upipe.models.llama3 import FLAVORS

    est = _estimate(tmp_path, 4, "--job.config_file", DEBUG_STACK,
                    "--parallelism.context_parallel_degree", "4", "--training.seq_len", "2048")
    a = FLAVORS["debugmodel"]
    b, s, c = 2, 2048, 4
    assert est["host_bytes"] == (a.n_layers - 1) * b * (s // c) * a.dim * 4
    st = mm.from_model_args(
        a, seq_len=s, batch=b, cp=c, world=4, style="upipe", param_bytes=4, act_bytes=4,
        offload=True, keep_layers=1, tiled_mlp=True, mlp_tiles=3, tiled_norm=True,
        chunked_loss=True, loss_chunk_tokens=-(-b * s // c // 3), fused_rms_norm=False,
        cuda_workspaces=False,
    )
    model = mm.breakdown(st)
    assert model["checkpointed_inputs_host"] == est["host_bytes"]
    assert abs(est["peak_bytes"] - model["peak_device"]) / model["peak_device"] < 0.05


def test_ring_style_is_refused_with_the_alternative(tmp_path):
    proc = _estimate(tmp_path, 2, "--job.config_file", DEBUG, "--context_parallel.style", "ring",
                     check=False)
    assert proc.returncode != 0
    assert "style = 'usp' with ulysses_degree = 1" in proc.stderr


# ------------------------------------------------------------------------------ the tracker
def _dtensor_bytes(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    full = torch.randn(64, 16)
    with LiveTensorTracker() as tracker:
        dt = distribute_tensor(full, mesh, [Shard(0)])
        doubled = dt * 2  # a DTensor op: its local result is made below the tracker's mode
        assert tracker.live_bytes == 2 * (64 // world_size) * 16 * 4
        del doubled
        torch.empty(0)  # any op refreshes the count
        assert tracker.live_bytes == (64 // world_size) * 16 * 4
        module = torch.nn.Linear(16, 8, device="meta")
        module.to_empty(device="cpu")  # swaps the parameters: no weak references to tensors
    assert tracker.peak_bytes >= 2 * (64 // world_size) * 16 * 4


def test_tracker_counts_the_local_tensors_of_dtensors():
    run_distributed(_dtensor_bytes, 2)


def test_tracker_counts_fake_tensors_by_storage():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), LiveTensorTracker() as tracker:
        a = torch.empty(1000, dtype=torch.float32)
        view = a.view(10, 100)  # the same storage: counted once
        b = torch.empty(500, dtype=torch.bfloat16)
        assert tracker.live_bytes == 4000 + 1000
        del a, b
        torch.empty(0)
        assert tracker.live_bytes == 4000  # the view keeps the storage alive
        del view
        torch.empty(0)
        assert tracker.live_bytes == 0
    assert tracker.peak_bytes == 5000
