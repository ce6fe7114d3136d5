"""The CPU memory estimator (torchtitan_upipe.tools.estimate).

The estimator runs rank 0 of an N-rank job under ``FakeTensorMode``.  Its ``--real`` mode runs
the very same steps with real tensors, so on small shapes the fake estimate must equal the
real-tensor measurement byte for byte: that is what shows fake tensors lose nothing (custom
ops, DTensor parameters, FSDP buffers, offloaded host buffers).  Against the GPU the error is
measured by the benchmark (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from torchtitan_upipe.tools.memtrack import LiveTensorTracker

from tests.helpers.estimate import estimate
from tests.helpers.paths import ROOT
DEBUG = os.path.join(ROOT, "train_configs", "llama3_debug_upipe.toml")
DEBUG_STACK = os.path.join(ROOT, "train_configs", "llama3_debug_upipe_memory.toml")


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
    "upipe_stack_optimizer": (4, DEBUG_STACK, "--parallelism.context_parallel_degree", "4",
                              "--training.seq_len", "2048", "--memory.offload_optimizer_state"),
    # another ring rank: its zigzag shard, its groups and the merges it does are its own
    "usp_2x2_rank2": (4, DEBUG_STACK, "--rank", "2", "--context_parallel.style", "usp",
                      "--context_parallel.ulysses_degree", "2",
                      "--parallelism.context_parallel_degree", "4",
                      "--training.seq_len", "1024"),
}


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=[] if c == "upipe_stack_c4" else [pytest.mark.slow]) for c in CASES],
)
def test_fake_estimate_equals_real_tensor_measurement(tmp_path, case):
    ngpu, *args = CASES[case]
    fake = estimate(tmp_path, ngpu, "--job.config_file", *args)
    real = estimate(tmp_path, ngpu, "--job.config_file", *args, real=True)
    assert fake["fake"] and not real["fake"]
    for key in KEYS:
        assert fake[key] == real[key], key
    # the step holds more than the initialized model, and step 2 also holds the Adam state
    assert fake["train_peak_bytes"][1] > fake["train_peak_bytes"][0] > fake["init_bytes"] > 0


def test_estimate_host_bytes_match_the_memory_model(tmp_path):
    """Offloaded inputs are host memory: exactly (L - keep) x (b, S/C, dim) x 4 bytes, as the
    analytic model (titan/memory_model.py) says.  (The device peaks are compared on Llama3-8B
    shapes below, where the model's terms dominate; at debug shapes its unmodelled small
    tensors, token ids and labels, matter.)"""
    from torchtitan_upipe.titan import memory_model as mm
    from torchtitan_upipe.titan.llama3 import FLAVORS

    est = estimate(tmp_path, 4, "--job.config_file", DEBUG_STACK,
                    "--parallelism.context_parallel_degree", "4", "--training.seq_len", "2048")
    a = FLAVORS["debugmodel"]
    b, s, c = 2, 2048, 4
    assert est["host_bytes"] == (a.n_layers - 1) * b * (s // c) * a.dim * 4
    st = mm.from_model_args(a, seq_len=s, batch=b, cp=c, world=4, style="upipe", param_bytes=4,
                            act_bytes=4, offload=True, keep_layers=1)
    assert mm.breakdown(st)["checkpointed_inputs_host"] == est["host_bytes"]
    # all of it page-locked on CUDA (memory.offload_pinned, the default), or none of it
    assert est["host_pinned_bytes"] == est["host_bytes"] and est["host_pinned_gib"] > 0
    (tmp_path / "pageable").mkdir()
    pageable = estimate(tmp_path / "pageable", 4, "--job.config_file", DEBUG_STACK,
                         "--parallelism.context_parallel_degree", "4", "--training.seq_len", "2048",
                         "--memory.no-offload-pinned")
    assert pageable["host_bytes"] == est["host_bytes"] and pageable["host_pinned_bytes"] == 0


def test_optimizer_state_on_the_host_leaves_the_forward_and_backward(tmp_path):
    """memory.offload_optimizer_state: from step 2 on (step 1's optimizer step makes the state)
    the forward and backward peak is lower by exactly rank 0's Adam state, which the host
    holds.  The optimizer phase peaks as before or lower (its gradient clipping runs before
    the pre-hook brings the state back)."""
    from tests.helpers.trainer import rank0_adam_bytes

    args = ("--job.config_file", DEBUG_STACK, "--parallelism.context_parallel_degree", "4",
            "--training.seq_len", "2048")
    base = estimate(tmp_path, 4, *args)
    (tmp_path / "opt").mkdir()
    est = estimate(tmp_path / "opt", 4, *args, "--memory.offload_optimizer_state")
    state = rank0_adam_bytes("debugmodel", 4)
    assert est["host_optimizer_bytes"] == state
    assert est["host_bytes"] == base["host_bytes"] + state
    assert est["train_peak_bytes"][0] == base["train_peak_bytes"][0]
    assert est["train_peak_bytes"][1] == base["train_peak_bytes"][1] - state
    assert est["optim_peak_bytes"][0] == base["optim_peak_bytes"][0]  # nothing offloaded yet
    assert 0 <= base["optim_peak_bytes"][1] - est["optim_peak_bytes"][1] < state


def test_offloaded_inputs_leave_the_device_count(tmp_path):
    """Offloading moves block inputs off the device: the estimate with every input kept on the
    device (``offload_keep_layers`` = all 6) is higher.  (How much depends on the layer whose
    backward holds the peak; counted as device memory, the host buffers would reverse it.)"""
    args = ("--job.config_file", DEBUG_STACK, "--parallelism.context_parallel_degree", "4",
            "--training.seq_len", "2048")
    offloaded = estimate(tmp_path, 4, *args)
    (tmp_path / "kept").mkdir()
    kept = estimate(tmp_path / "kept", 4, *args, "--memory.offload_keep_layers", "6")
    x = 2 * (2048 // 4) * 256 * 4  # one block input, fp32
    assert offloaded["host_bytes"] == 5 * x and kept["host_bytes"] == 0
    assert kept["peak_bytes"] > offloaded["peak_bytes"]


def test_host_buffers_are_not_counted_as_device_memory():
    from torchtitan_upipe.memory import HostMemory, HostOffloader
    from torchtitan_upipe.tools.estimate.fake_world import Counted

    counted = Counted(fake=False)
    tracker = counted.tracker = LiveTensorTracker(ignore=counted.ignore)
    offloader = HostOffloader(torch.device("cpu"), host_memory=HostMemory(
        pinned=False, allocate=counted.allocate_host))
    x = torch.randn(1000)
    with tracker:
        offloader.offload(0, x)  # fills a new 4000-byte host buffer
        # not even for a moment: a buffer made at a peak would raise it
        assert tracker.live_bytes == 0 and tracker.peak_bytes == 0
        offloader.offload(0, x)  # reuses it (copy_ returns the buffer again)
        assert tracker.live_bytes == 0
        y = offloader.reload(0)  # the copy back is device memory
        assert tracker.live_bytes == 4000 and torch.equal(y, x)
    assert offloader.host_bytes() == 4000 and len(counted.host) == 1


def test_ranks_of_a_ring_differ_and_all_to_all_ranks_do_not(tmp_path):
    """``--rank``: the estimate of another rank of the job.  UPipe over all-to-alls treats
    every rank alike; a causal zigzag ring does not (rank 0 merges half blocks where later
    ring ranks merge whole ones), so a one-rank simulation must pick its rank."""
    def peak(*args):
        d = tmp_path / "_".join(a.strip("-").replace(".", "_") for a in args)
        d.mkdir()
        est = estimate(d, 4, "--job.config_file", DEBUG_STACK,
                        "--parallelism.context_parallel_degree", "4",
                        "--training.seq_len", "1024", *args)
        return est["rank"], est["peak_bytes"]

    a2a = [peak("--rank", r) for r in ("0", "3")]
    assert a2a[0][0] == 0 and a2a[1][0] == 3 and a2a[0][1] == a2a[1][1]
    usp = ("--context_parallel.style", "usp", "--context_parallel.ulysses_degree", "2")
    ring = [peak(*usp, "--rank", r)[1] for r in ("0", "2")]
    assert ring[0] != ring[1], ring


def test_a_rank_outside_the_job_is_refused_in_one_line(tmp_path):
    proc = estimate(tmp_path, 2, "--rank", "2", "--job.config_file", DEBUG, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "python -m torchtitan_upipe.tools.estimate: error: --rank 2 is not a rank of the 2-rank "
        "job; valid: 0 to 1")
    assert "Traceback" not in proc.stderr


def test_the_summary_reads_like_a_tool_and_json_on_request(tmp_path):
    """Default: the peak and where it is, host per rank and node, the reserve's verdict."""
    cmd = [sys.executable, "-m", "torchtitan_upipe.tools.estimate", "--ngpu", "2",
           "--job.config_file", DEBUG_STACK, "--device-gib", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    run = functools.partial(subprocess.run, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    proc = run(cmd + ["--reserve-gib", "0.5"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("upipe_llama3/debugmodel, 6 layers, 512 tokens, style 'upipe': "
                               "rank 0 of 2; CPU estimate (fake tensors), 2 steps")
    assert re.match(r"  peak device   0\.\d\d GiB, in step \d (forward\+backward|optimizer)",
                    lines[1])
    assert any(re.match(r"  host          0\.\d\d GiB per rank \(pinned\), 0\.\d GiB per node "
                        r"of 2 ranks", line) for line in lines)
    assert any(re.match(r"  verdict       fits: peak \+ 0\.5 GiB reserve = 0\.\d\d GiB <= 1 GiB",
                        line) for line in lines)
    assert "Warning" not in proc.stderr and "lspci" not in proc.stderr + proc.stdout
    proc = run(cmd + ["--reserve-gib", "0.99", "--json"])
    est = json.loads(proc.stdout)
    assert est["peak_bytes"] > 0.01 * 2**30 and est["peak_phase"].startswith("step ")
    proc = run(cmd)  # the default 4 GiB reserve does not fit in 1 GiB: said before estimating
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "python -m torchtitan_upipe.tools.estimate: error: --reserve-gib 4, --device-gib or --gpu: "
        "the device reserve must be >= 0 and below the device memory (1 GiB), got 4.0")


def test_ring_style_is_refused_with_the_alternative(tmp_path):
    proc = estimate(tmp_path, 2, "--job.config_file", DEBUG, "--context_parallel.style", "ring",
                     check=False)
    assert proc.returncode != 0
    assert "style = 'usp' with ulysses_degree = 1" in proc.stderr


def test_cuda_target_adds_the_fa2_workspace_at_the_attention_backward(tmp_path):
    """The CUDA target counts FA2's backward workspace at each attention backward, sized for
    a UPipe stage (U = 4 query heads, 2 per rank, over 2 samples of 512 tokens).  This job
    peaks outside the attention (the debug model's MLP and loss), so the workspace must not
    raise the peak; the estimator used to add it anyway.  Where an attention backward is the
    peak, the Llama3-8B agreement tests below need the workspace to match the model."""
    from torchtitan_upipe.titan import memory_model as mm
    from torchtitan_upipe.titan.llama3 import FLAVORS

    args = ("--job.config_file", DEBUG, "--context_parallel.upipe_chunk_heads", "4")
    cpu = estimate(tmp_path, 2, *args)
    cuda = estimate(tmp_path, 2, *args, target="cuda")
    a = FLAVORS["debugmodel"]  # 16 heads of 16 dims, no GQA; fp32 in this config
    st = mm.from_model_args(a, seq_len=512, batch=2, cp=2, world=2, style="upipe",
                            chunk_heads=4, param_bytes=4, act_bytes=4)
    ws = 4 * (2 * 512 * 2 * 16) * (1 + 1 / 16)  # dq_accum + softmax_d: 2 heads per rank
    assert cuda["workspace_bytes"] == mm.attention_workspace_bytes(st) == ws
    assert cpu["workspace_bytes"] == 0
    for key in ("peak_bytes", "train_peak_bytes", "init_bytes", "optim_peak_bytes", "host_bytes"):
        assert cuda[key] == cpu[key], key


@pytest.mark.slow
def test_packed_documents_are_estimated_as_one_document_per_row(tmp_path):
    """Fake tokens have no values, so the estimate of a block_causal flavor is the causal one
    (one document per row); the real-tensor run with the debug text's documents (4 in the
    batch) holds no more than that, but for the O(documents) offsets."""
    flex = ("--model.flavor", "debugmodel_flex_attn")
    for sub in ("causal", "flex"):
        (tmp_path / sub).mkdir()
    causal = estimate(tmp_path / "causal", 2, "--job.config_file", DEBUG_STACK)
    fake = estimate(tmp_path / "flex", 2, "--job.config_file", DEBUG_STACK, *flex)
    real = estimate(tmp_path / "flex", 2, "--job.config_file", DEBUG_STACK, *flex, real=True)
    for key in KEYS:
        assert fake[key] == causal[key], key
    # plus the documents' offsets on the host (int64 each; 24 bytes more were measured)
    assert max(real["train_peak_bytes"]) <= max(fake["train_peak_bytes"]) + 1024
    assert real["host_bytes"] == fake["host_bytes"]
