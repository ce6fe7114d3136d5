"""Fitting a job into device and host memory (torchtitan_upipe.titan.fitting) and
``upipe_chunk_heads = "auto"``: against the committed CPU-estimator runs, the paper's
maximum contexts, and the trainer's config-time checks."""

from __future__ import annotations

import glob
import json
import os

import pytest

import torchtitan_upipe.train_spec  # noqa: F401  (registers upipe_llama3)
from benchmarks.memory_table import setup_of_run
from tests.helpers.paths import CONFIGS, ROOT
from torchtitan.config import ConfigManager
from torchtitan_upipe.titan import fitting as fm
from torchtitan_upipe.titan import memory_model as mm
from torchtitan_upipe.titan.checks import validate_job_config
from torchtitan_upipe.titan.config import ConfigError

M = 1 << 20
H100 = fm.Budget(80.0, 4.0)  # the benchmark report's rule: peak + 4 GiB <= 80 GiB


def _8b(seq_len, **kw):
    return mm.stack(mm.from_flavor("8B", seq_len=seq_len, cp=8, world=8, style="upipe", **kw))


def _runs():
    """Full-depth CPU-estimator runs committed under docs/results."""
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "docs", "results", "*estimate*.json"))):
        with open(path) as f:
            for run in json.load(f)["runs"]:
                if run.get("kind") == "estimate" and run["ok"] and run["spec"]["n_layers"] == 0:
                    out.append(run)
    return out


# ------------------------------------------------------------------------------ budget
@pytest.mark.parametrize("kw,words", [
    ({"device_gib": 0}, "device memory per GPU must be > 0"),
    ({"device_gib": 8, "reserve_gib": 8}, "reserve must be >= 0 and below"),
    ({"device_gib": 8, "host_gib": 16, "host_reserve_gib": 20}, "host reserve"),
    ({"device_gib": 8, "ranks_per_node": 0}, "ranks per node must be >= 1"),
])
def test_a_bad_budget_is_refused_with_what_is_wrong(kw, words):
    with pytest.raises(ConfigError, match=words):
        fm.Budget(**kw)


def test_an_unknown_gpu_names_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown GPU 'h300'.*\['a100', 'b200', 'h100', 'h200'\]"):
        fm.get_gpu("h300")
    assert fm.get_gpu("H-100") is fm.GPUS["h100"]


def test_host_memory_is_per_node_and_decides_the_fit():
    st = mm.replace(_8b(4 * M, chunk_heads=8), keep_layers=0)
    host_rank = mm.breakdown(st)["checkpointed_inputs_host"]
    assert host_rank == 32 * 2 * (4 * M // 8) * 4096  # every block input, bf16
    roomy = fm.fit(st, fm.Budget(80, 4, host_gib=2048, ranks_per_node=8))
    tight = fm.fit(st, fm.Budget(80, 4, host_gib=512, ranks_per_node=8))
    assert roomy.ok and roomy.host_node == 8 * host_rank
    assert tight.device_ok and not tight.host_ok and not tight.ok
    assert "does not fit" in tight.verdict() and "per node" in tight.verdict()


# ---------------------------------------------------------------------- agrees with runs
def test_the_model_agrees_with_every_committed_estimator_run():
    """The stated error of the planner's peaks: within -1% and +5% of the CPU estimator on
    every committed full-depth run (the model errs high, most on the 16-rank hybrids)."""
    runs = _runs()
    assert len(runs) >= 50
    errors = {}
    for run in runs:
        model = fm.fit(setup_of_run(run["spec"]), H100).peak / fm.GiB
        errors[run["label"] + " " + " ".join(run["spec"]["extra"])] = model / run["est_peak_gib"] - 1
    bad = {k: f"{v:+.2%}" for k, v in errors.items() if not -0.01 < v < 0.05}
    assert not bad


def test_fits_where_the_estimator_fits():
    """At 80 GiB less 4, the model's verdict is the estimator's on every committed run away
    from the limit (more than the stated error from it)."""
    for run in _runs():
        f = fm.fit(setup_of_run(run["spec"]), H100)
        est_ok = run["est_peak_gib"] <= 76
        if abs(run["est_peak_gib"] - 76) > 0.05 * 76:
            assert f.device_ok == est_ok, run["label"]


# (config, options, [longest committed length that fits, shortest that does not]) from the
# committed estimator runs: the paper's max contexts (8B/8: UPipe 5M with prefetch off, Ulysses
# 3M; 8B/16: UPipe 8M, USP 6M; 32B/16: UPipe 4M, USP 2M, a ring 2M)
PAPER_MAX = [
    ("llama3_8b_8xh100_upipe.toml", [], 8, (4 * M, 5 * M)),
    ("llama3_8b_8xh100_upipe.toml", ["--memory.no_offload_prefetch"], 8, (5 * M, 6 * M)),
    ("llama3_8b_8xh100_ulysses.toml", [], 8, (3 * M, 4 * M)),
    ("llama3_8b_16xh100_upipe.toml", [], 16, (8 * M, None)),
    ("llama3_8b_16xh100_usp.toml", [], 16, (6 * M, 8 * M)),
    ("llama3_32b_16xh100_upipe.toml", [], 16, (4 * M, 5 * M)),
    ("llama3_32b_16xh100_usp.toml", [], 16, (2 * M, 3 * M)),
    ("llama3_32b_16xh100_usp.toml", ["--context_parallel.ulysses_degree", "1"], 16, (2 * M, 3 * M)),
]


@pytest.mark.parametrize("config,extra,world,bracket", PAPER_MAX,
                         ids=[f"{c[0]}{' '.join(c[1])}" for c in PAPER_MAX])
def test_max_context_lies_between_the_estimators_fitting_and_failing_lengths(config, extra, world,
                                                                           bracket):
    job = ConfigManager().parse_args(["--job.config_file", os.path.join(CONFIGS, config), *extra])
    st = mm.from_job_config(job, world)
    longest = fm.max_context(st, H100, fits=lambda s: fm.fit(s, H100).device_ok)
    lo, hi = bracket
    assert longest >= lo and (hi is None or longest < hi), longest / M
    assert longest % fm.seq_quantum(st) == 0
    assert fm.fit(mm.replace(st, seq_len=longest), H100).device_ok
    assert not fm.fit(mm.replace(st, seq_len=longest + fm.seq_quantum(st)), H100).device_ok


# ------------------------------------------------------------------------------- UPipe U
def test_auto_takes_u_equal_h_where_everything_fits_and_c_near_the_limit():
    roomy = fm.choose_chunk_heads(_8b(128 * 1024), H100)
    assert roomy.chunk_heads == 32 and len(roomy.tried) == 1
    near = _8b(5 * M)  # 8B at 5M: only U = 8 fits, with prefetch off
    near = mm.replace(near, offload_prefetch=False)
    peaks = {u: fm.fit(mm.replace(near, chunk_heads=u), H100).peak for u in (32, 16, 8)}
    assert peaks[8] < 76 * fm.GiB < peaks[16] < peaks[32]
    choice = fm.choose_chunk_heads(near, H100)
    assert choice.chunk_heads == 8 and [u for u, _ in choice.tried] == [32, 16, 8]
    assert "U=8" in choice.reason() and "U=16 would need" in choice.reason()


def test_chunk_heads_choices_are_the_schedules_valid_u():
    assert fm.chunk_heads_choices(32, 8, 8) == [32, 16, 8]  # 8B on 8
    assert fm.chunk_heads_choices(64, 8, 8) == [64, 32, 16, 8]  # 32B, u = 8 of 16


def _debug_job(*extra):
    return ConfigManager().parse_args([
        "--job.config_file", os.path.join(CONFIGS, "llama3_debug_upipe_memory.toml"),
        "--training.seq_len", "2048", "--context_parallel.upipe_chunk_heads", "auto", *extra])


@pytest.mark.parametrize("device_gib,want", [(10.0, 16), (0.081, 8)])
def test_auto_is_resolved_at_config_time(device_gib, want):
    """The debug model at 2048 tokens: U = 16 peaks at 92 MiB, U = 8 at 82, U = 4 at 81."""
    job = _debug_job("--memory.device_gib", str(device_gib), "--memory.reserve_gib", "0")
    shape = validate_job_config(job, world_size=2, cuda=False)
    assert job.context_parallel.upipe_chunk_heads == want == shape.chunk_heads


def test_auto_that_fits_nothing_says_what_would():
    job = _debug_job("--memory.device_gib", "0.07", "--memory.reserve_gib", "0")
    with pytest.raises(ConfigError) as e:
        validate_job_config(job, world_size=2, cuda=False)
    msg = str(e.value)
    assert "no U fits training.seq_len=2048" in msg and "U=2" in msg
    assert "the longest context that fits is training.seq_len=1024" in msg
    assert job.context_parallel.upipe_chunk_heads == "auto"  # left as the user wrote it


@pytest.mark.parametrize("extra,words", [
    (["--memory.device_gib", "1", "--context_parallel.style", "ulysses"],
     "chooses UPipe's U, but context_parallel.style='ulysses'"),
    (["--memory.device_gib", "1", "--activation_checkpoint.mode", "selective"],
     "set activation_checkpoint.mode='full'"),
    ([], "there is no CUDA device to read it from: set memory.device_gib"),
    (["--memory.device_gib", "1", "--memory.reserve_gib", "2"], "memory.reserve_gib=2 leaves nothing"),
])
def test_auto_with_bad_options_is_refused(extra, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        validate_job_config(_debug_job(*extra), world_size=2, cuda=False)


def test_auto_skips_a_u_the_style_refuses():
    """A U the style's own checks refuse (here: FlashAttention-2's offset limit on CUDA for
    Ulysses-sized calls) is not chosen even where it fits."""
    job = ConfigManager().parse_args([
        "--job.config_file", os.path.join(CONFIGS, "llama3_8b_8xh100_upipe.toml"),
        "--training.seq_len", str(6 * M), "--context_parallel.kernel", "sdpa",
        "--context_parallel.upipe_chunk_heads", "auto", "--memory.device_gib", "1000",
        "--training.mixed_precision_param", "bfloat16"])
    validate_job_config(job, world_size=8, cuda=True)
    # U = 32 (4 heads per rank) overflows at 6M: 6M x 4 x 128 >= 2^31; U = 16 does not
    assert job.context_parallel.upipe_chunk_heads == 16


# ----------------------------------------------------------------------- memory options
def test_remedies_fit_and_come_fewest_changes_first():
    st = mm.replace(_8b(5 * M, chunk_heads=8), keep_layers=1)  # 79.5 GiB: does not fit
    assert not fm.fit(st, H100).device_ok
    fixes = fm.remedies(st, H100)
    assert fixes and all(f.ok for _, f in fixes)
    counts = [len(c) for c, _ in fixes]
    assert counts == sorted(counts)
    # the free changes first: the residual gradients summed in place and wo fused into the
    # op (a block-sized gradient less each), part of every remedy
    free = {"memory.offload_inplace_residual_grads": True, "memory.fuse_output_projection": True}
    assert fixes[0][0] == free
    assert all(changes.items() >= free.items() for changes, _ in fixes)
    args = fm.option_args({"memory.offload_prefetch": False, "memory.offload_keep_layers": 0,
                           "memory.tiled_mlp": True})
    assert args == ["--memory.no_offload_prefetch", "--memory.offload_keep_layers", "0",
                    "--memory.tiled_mlp"]


def test_the_option_flags_parse_as_train_py_parses_them():
    args = fm.option_args({"memory.offload_prefetch": False, "memory.offload_keep_layers": 0,
                           "memory.chunked_loss": True, "context_parallel.upipe_chunk_heads": 4})
    job = ConfigManager().parse_args(
        ["--job.config_file", os.path.join(CONFIGS, "llama3_debug_upipe.toml"), *args])
    assert (job.memory.offload_prefetch, job.memory.offload_keep_layers, job.memory.chunked_loss,
            job.context_parallel.upipe_chunk_heads) == (False, 0, True, 4)


@pytest.mark.parametrize("host", [1400, 600, 250])
@pytest.mark.parametrize("seq", [3 * M, 5 * M, 6 * M])
def test_fitting_keep_is_the_largest_keep_that_fits(seq, host):
    """The bisection over keep_layers equals a linear scan; where no keep_layers fits the
    host (at 5M with 600 GiB of host per node the device needs more layers offloaded than
    the host can take), segment checkpointing: the smallest offload_stride, then the largest
    keep_layers, of a scan over both (None if none fits)."""
    st = _8b(seq, chunk_heads=8)
    budget = fm.Budget(80, 4, host_gib=host, ranks_per_node=8)
    got = fm.fitting_keep(st, budget)

    def fits(keep, stride=1):
        return fm.fit(fm.with_free_options(mm.replace(
            st, offload=True, keep_layers=keep, offload_stride=stride)), budget).ok

    scan = [k for k in range(32) if fits(k)]
    strided = [(s, k) for s in fm.STRIDES for k in range(32) if (32 - k) % s == 0 and fits(k, s)]
    if fm.fit(fm.with_free_options(mm.replace(st, offload=False)), budget).ok:
        assert got is not None and not got.setup.offload
    elif scan:
        assert got is not None and got.setup.keep_layers == max(scan)
        assert got.setup.offload_stride == 1
    elif not strided:
        assert got is None
    else:
        stride, keep = min(strided, key=lambda r: (r[0], -r[1]))
        assert got is not None and got.ok
        assert (got.setup.offload_stride, got.setup.keep_layers) == (stride, keep)
    if (seq, host) == (5 * M, 600):
        assert not scan and strided and got.setup.offload_stride > 1


def test_leanest_is_the_least_device_memory():
    st = _8b(2 * M, chunk_heads=8)
    lean = fm.fit(fm.leanest(st), H100).peak
    assert all(lean <= fm.fit(v, H100).peak for v in fm.memory_variants(st))


@pytest.mark.slow
def test_a_trainer_run_with_auto_trains_with_the_chosen_u(tmp_path):
    """A tiny device budget on the debug model: auto chooses U = 8 of 16 and train.py trains
    with it (the log says which U and why; the losses are finite)."""
    from tests.helpers.trainer import check, run_train, tensorboard_losses

    proc = run_train(2, "llama3_debug_upipe_memory.toml", "--training.seq_len", "2048",
                     "--training.steps", "2", "--context_parallel.upipe_chunk_heads", "auto",
                     "--memory.device_gib", "0.081", "--memory.reserve_gib", "0",
                     "--job.dump_folder", str(tmp_path), cwd=str(tmp_path))
    check(proc)
    log = proc.stdout + proc.stderr
    assert "context_parallel.upipe_chunk_heads='auto' -> U=8, the largest of the valid [16, 8, 4, 2]" in log, log[-3000:]
    assert "U=16 would need" in log
    losses = tensorboard_losses(str(tmp_path))
    assert sorted(losses) == [1, 2] and all(0 < v < 20 for v in losses.values())
