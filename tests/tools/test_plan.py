"""The planner (python -m torchtitan_upipe.tools.plan): its answers, its command lines, its
step-time prediction and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import torchtitan_upipe.train_spec  # noqa: F401  (registers upipe_llama3)
from tests.helpers.paths import CONFIGS, ROOT
from torchtitan.config import ConfigManager
from torchtitan_upipe.titan import fitting as fm
from torchtitan_upipe.titan import memory_model as mm
from torchtitan_upipe.titan.checks import model_args, validate_job_config
from torchtitan_upipe.tools.plan import planner, speed
from torchtitan_upipe.tools.plan.search import Job

M = 1 << 20
CFG8 = os.path.join(CONFIGS, "llama3_8b_8xh100_upipe.toml")
CFG32 = os.path.join(CONFIGS, "llama3_32b_16xh100_upipe.toml")


def _plan(*argv):
    ours, rest = planner.parse(["--no-confirm", *argv])
    return planner.run(ours, rest), ours, rest


def _setup_of_command(cmd: str, world: int) -> mm.Setup:
    """The job a printed ``torchrun ... train.py ...`` command runs, as train.py reads it."""
    args = cmd.split(" train.py ", 1)[1].split()
    job = ConfigManager().parse_args(args)
    validate_job_config(job, world, cuda=True)
    return mm.from_job_config(job, world)


def test_the_answer_for_2m_on_8_h200_is_a_command_that_runs_what_was_planned():
    out, ours, rest = _plan("--gpus", "8", "--gpu", "h200", "--job.config_file", CFG8,
                            "--training.seq_len", str(2 * M), "--benchmark.device_memory_gib", "0")
    ans = out["answer"]
    assert ans["fits"] and ans["peak_gib"] <= 139.7 - 4
    assert out["seq_len"] == 2 * M and "not measured" in out["predicted"]
    st = _setup_of_command(ans["command"], 8)
    assert st.seq_len == 2 * M
    assert mm.breakdown(st)["peak_device"] / fm.GiB == pytest.approx(ans["peak_gib"])
    # the fastest of every row's fastest
    tps = [r["best"]["predicted_tps"] for r in out["rows"] if r["fits"]]
    assert ans["predicted_tps"] == max(tps)


def test_a_length_that_only_upipe_fits_is_planned_as_upipe():
    """8B at 6M on 8 x 80 GB: Ulysses and USP do not fit at any memory option; UPipe does."""
    out, _, _ = _plan("--gpus", "8", "--device-gib", "80", "--job.config_file", CFG8,
                      "--training.seq_len", str(6 * M))
    rows = {r["row"]: r for r in out["rows"]}
    assert not rows["ulysses u=8"]["fits"] and not rows["usp u=4"]["fits"]
    assert rows["upipe u=8"]["fits"]
    assert out["answer"]["style"] == "upipe"
    assert "does not fit" in planner.text(out)


def test_max_context_for_llama3_8b_on_8_h100():
    out, _, _ = _plan("--gpus", "8", "--gpu", "h100", "--job.config_file", CFG8, "--max-context")
    found = {m["row"]: m for m in out["max_context"]}
    # the paper: Ulysses 3M, UPipe 5M (both measured with their own options); ours searches
    # the memory options too (offload every layer, no prefetch, refetched inputs, in-place
    # residual gradients, wo fused into UPipe's op, the optimizer state on the host, and
    # segment checkpointing, without which a node's 2 TiB of host memory would bind first)
    assert 5 * M <= found["ulysses u=8"]["seq_len"] < 7 * M
    assert 8 * M <= found["upipe u=8"]["seq_len"] < 9 * M
    command = found["upipe u=8"]["at"]["command"]
    for option in ("--memory.offload_optimizer_state", "--memory.fuse_output_projection",
                   "--memory.offload_inplace_residual_grads", "--memory.offload_refetch_input",
                   "--memory.offload_stride 2"):
        assert option in command
    assert found["upipe u=8"]["seq_len"] > found["ulysses u=8"]["seq_len"]
    for m in found.values():
        at = m["at"]
        assert at["fits"] and at["seq_len"] == m["seq_len"]
        assert _setup_of_command(at["command"], 8).seq_len == m["seq_len"]
    best = max(found.values(), key=lambda m: m["seq_len"])
    assert out["answer"]["seq_len"] == best["seq_len"]
    assert "Longest context per style" in planner.text(out)


def test_a_configured_device_cap_is_planned_for_and_said():
    """The H100 configs cap the device at 80 GiB (benchmark.device_memory_gib): on H200s the
    plan is for 80 unless the cap is lifted."""
    capped, _, _ = _plan("--gpus", "8", "--gpu", "h200", "--job.config_file", CFG8)
    assert capped["device_gib"] == 80 and "device_memory_gib=80 caps" in planner.text(capped)
    whole, _, _ = _plan("--gpus", "8", "--gpu", "h200", "--job.config_file", CFG8,
                        "--benchmark.device_memory_gib", "0")
    assert whole["device_gib"] == fm.GPUS["h200"].memory_gib and whole["device_cap"] is None


def test_the_host_budget_binds_and_is_said():
    """8B at 5M on 8 ranks: with 600 GiB of host per node only segment checkpointing fits
    (the leanest device options hold every input on the host); with 300 GiB nothing does."""
    out, _, _ = _plan("--gpus", "8", "--device-gib", "80", "--host-gib", "600",
                      "--job.config_file", CFG8, "--training.seq_len", str(5 * M))
    rows = {r["row"]: r for r in out["rows"]}
    lean = rows["upipe u=8"]["leanest"]
    assert lean["device_ok"] and not lean["host_ok"]
    assert rows["upipe u=8"]["fits"]
    assert "--memory.offload_stride" in out["answer"]["command"]
    out, _, _ = _plan("--gpus", "8", "--device-gib", "80", "--host-gib", "300",
                      "--job.config_file", CFG8, "--training.seq_len", str(5 * M))
    rows = {r["row"]: r for r in out["rows"]}
    assert not rows["upipe u=8"]["fits"]
    assert "over: host" in planner.text(out)


def test_sixteen_gpus_plan_two_nodes():
    out, _, _ = _plan("--gpus", "16", "--gpu", "h100", "--job.config_file", CFG32,
                      "--training.seq_len", str(4 * M))
    ans = out["answer"]
    assert ans["style"] == "upipe" and out["ranks_per_node"] == 8
    assert ans["command"].startswith("torchrun --nproc_per_node 8 --nnodes 2 ")
    assert ans["host_node_gib"] == pytest.approx(8 * ans["host_rank_gib"])


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("argv,words", [
    (["--gpus", "8", "--gpu", "h300"], "unknown GPU 'h300'"),
    (["--gpus", "0"], "--gpus must be >= 1"),
    (["--gpus", "8", "--device-gib", "12"], "the model states alone"),
    (["--gpus", "8", "--host-gib", "0"], "--host-gib must be > 0"),
    (["--gpus", "8", "--activation_checkpoint.mode", "selective"], "full activation checkpointing"),
])
def test_bad_input_gets_one_line(argv, words):
    proc = subprocess.run([sys.executable, "-m", "torchtitan_upipe.tools.plan", "--no-confirm",
                           "--job.config_file", CFG8, *argv],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert words in proc.stderr and "Traceback" not in proc.stderr


def test_a_config_file_is_required():
    with pytest.raises(SystemExit):
        planner.parse(["--gpus", "8"])


# -------------------------------------------------------------------------- arguments
def test_train_args_replace_what_they_set():
    rest = ["--job.config_file", "x.toml", "--context_parallel.style", "ulysses",
            "--memory.no-offload-prefetch", "--memory.offload_keep_layers=3",
            "--training.seq_len", "8"]
    got = planner.train_args(rest, {"context_parallel.style": "upipe",
                                    "memory.offload_prefetch": True,
                                    "memory.offload_keep_layers": 0})
    assert got == ["--job.config_file", "x.toml", "--training.seq_len", "8",
                   "--context_parallel.style", "upipe", "--memory.offload_prefetch",
                   "--memory.offload_keep_layers", "0"]


# ---------------------------------------------------------------------- the prediction
def test_the_prediction_ranks_by_what_moves():
    hw = speed.Hardware(fm.GPUS["h100"])

    def tps(**kw):
        return speed.predict(mm.stack(mm.from_flavor("8B", seq_len=M, cp=8, world=8, **kw)), hw).tps

    ulysses, upipe32, upipe8 = (tps(style="ulysses"), tps(style="upipe", chunk_heads=32),
                                tps(style="upipe", chunk_heads=8))
    assert ulysses > upipe32 > upipe8  # UPipe re-sends and re-projects; more stages, more calls
    assert upipe8 / ulysses > 0.9
    ring = mm.from_flavor("8B", seq_len=M, cp=8, world=8, style="usp", ulysses=1)
    assert speed.ring_merge_bytes(ring) > 0
    assert speed.ring_merge_bytes(mm.from_flavor("8B", seq_len=M, cp=8, world=8,
                                                 style="ulysses")) == 0
    off = mm.stack(mm.from_flavor("8B", seq_len=M, cp=8, world=8, style="upipe"))
    assert speed.offload_seconds(off, hw) == 0  # pinned, prefetched: hidden
    assert speed.offload_seconds(mm.replace(off, offload_prefetch=False), hw) > 0
    assert speed.offload_seconds(off, hw, pinned=False) > speed.offload_seconds(
        mm.replace(off, offload_prefetch=False), hw)


def test_step_flops_are_the_standard_count():
    """6 P T for the matmuls plus the recompute's 2 P T, and causal attention."""
    st = mm.from_flavor("8B", seq_len=M, cp=8, world=8, style="ulysses")
    m = st.shape.model
    want = st.tokens * (m.n_layers * (8 * m.block_params + 9 * M * m.n_heads * m.head_dim)
                        + 6 * m.vocab * m.dim)
    assert speed.step_flops(st) == pytest.approx(want)


def test_the_png_is_drawn(tmp_path):
    out, _, _ = _plan("--gpus", "8", "--gpu", "h100", "--job.config_file", CFG8,
                      "--png", str(tmp_path / "peaks.png"))
    assert out["png"] and (tmp_path / "peaks.png").stat().st_size > 10_000


def test_json_is_printed_for_scripts(capsys):
    assert planner.main(["--no-confirm", "--json", "--gpus", "8", "--job.config_file", CFG8]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["answer"]["command"].startswith("torchrun --nproc_per_node 8 train.py")


# ------------------------------------------------------------------------ confirmation
@pytest.mark.slow
def test_the_answer_is_confirmed_by_the_estimator(tmp_path):
    """The debug model on 2 ranks with the memory stack: the planner's choice run through the
    CPU estimator (a subprocess: the estimator keeps a fake process group)."""
    proc = subprocess.run(
        [sys.executable, "-m", "torchtitan_upipe.tools.plan", "--json", "--gpus", "2",
         "--device-gib", "0.5", "--reserve-gib", "0", "--job.config_file",
         os.path.join(CONFIGS, "llama3_debug_upipe_memory.toml"), "--training.seq_len", "2048",
         "--training.mixed_precision_param", "bfloat16",  # what the CUDA kernels take
         "--job.dump_folder", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    c = out["confirm"]
    assert c["n_layers"] == 4 and c["command"].startswith("python -m torchtitan_upipe.tools.estimate")
    assert "--benchmark.n_layers 4" in c["command"]
    assert abs(c["model_over_estimate"]) < 0.25, c  # the CPU path: composite RMSNorm
    assert c["model_host_gib"] == pytest.approx(c["estimate_host_gib"])


def test_a_job_without_a_valid_layout_says_why():
    job = ConfigManager().parse_args(["--job.config_file", CFG8, "--training.seq_len", "1004"])
    with pytest.raises(fm.ConfigError, match="no context-parallel layout.*not divisible by"):
        Job(job, 8, fm.Budget(80), speed.Hardware(fm.GPUS["h100"]), model_args(job))


@pytest.mark.parametrize("seq", [M, 13 * M // 2])
def test_auto_takes_the_planners_u(seq):
    """upipe_chunk_heads = "auto" on the planner's memory options for its UPipe row chooses
    the planner's U (1M: everything fits, U = H; 6.5M: only U = C does)."""
    out, _, _ = _plan("--gpus", "8", "--device-gib", "80", "--job.config_file", CFG8,
                      "--training.seq_len", str(seq))
    best = {r["row"]: r for r in out["rows"]}["upipe u=8"]["best"]
    memory = {k: v for k, v in best["options"].items() if k.startswith("memory.")}
    job = ConfigManager().parse_args([
        "--job.config_file", CFG8, "--training.seq_len", str(seq), *fm.option_args(memory),
        "--context_parallel.upipe_chunk_heads", "auto", "--memory.device_gib", "80",
        "--memory.reserve_gib", "4"])
    validate_job_config(job, 8, cuda=True)
    assert job.context_parallel.upipe_chunk_heads == best["chunk_heads"]
    assert best["chunk_heads"] == (32 if seq == M else 8)


def test_a_page_lock_limit_plans_pageable_buffers():
    """8B at 5M offloads about 1.2 TiB per node; with only 100 GiB lockable the plan keeps
    the buffers pageable, and pays for the synchronous copies in its prediction."""
    free, _, _ = _plan("--gpus", "8", "--device-gib", "80", "--job.config_file", CFG8,
                       "--training.seq_len", str(5 * M))
    locked, _, _ = _plan("--gpus", "8", "--device-gib", "80", "--pinned-gib", "100",
                         "--job.config_file", CFG8, "--training.seq_len", str(5 * M))
    a, b = free["answer"], locked["answer"]
    assert a["pinned"] is True and "memory.offload_pinned" not in a["options"]
    assert b["pinned"] is False and b["options"]["memory.offload_pinned"] is False
    assert b["predicted_offload_s"] > a["predicted_offload_s"]
    assert "--memory.no_offload_pinned" in b["command"]
    assert _setup_of_command(b["command"], 8).offload


def test_flash_attention_2s_offset_limit_bounds_the_context():
    """Off Hopper (A100: kernel 'auto' is FlashAttention-2), or with kernel = 'sdpa' on an
    H100, Ulysses on 8 ranks stops below 2^31 / (4 heads x 128) query tokens = 4M; with
    cuDNN ('auto' on Hopper) only memory bounds it."""
    limit = (1 << 31) // (4 * 128)
    whole = ["--benchmark.device_memory_gib", "0"]  # lift the H100 config's 80 GiB cap
    for argv in (["--gpu", "a100", "--device-gib", "1000"],
                 ["--gpu", "h100", "--device-gib", "1000", "--context_parallel.kernel", "sdpa",
                  "--training.mixed_precision_param", "bfloat16"]):
        out, _, _ = _plan("--gpus", "8", "--job.config_file", CFG8, "--max-context", *whole,
                          *argv)
        found = {m["row"]: m["seq_len"] for m in out["max_context"]}
        assert found["ulysses u=8"] < limit <= found["upipe u=8"]
    cudnn, _, _ = _plan("--gpus", "8", "--gpu", "h100", "--device-gib", "1000",
                        "--job.config_file", CFG8, "--max-context", *whole)
    assert {m["row"]: m["seq_len"] for m in cudnn["max_context"]}["ulysses u=8"] > limit
