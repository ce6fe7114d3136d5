"""What a new user meets in the first hour, end to end under torchrun on CPU (2 gloo ranks).

* the README's main job prints one clean log: each line once, no MFU against a made-up peak,
  none of the warnings that do not apply, and tokens counted once;
* a user error is one line from train.py (torchrun's own summary follows it);
* stop and resume, or extend a run, the ways the README gives: a planned stop continues
  exactly, an extension is refused with what to do and then rebuilt on request, and a
  weights-only last save is refused by name.
"""

import re
from pathlib import Path

import pytest

from tests.helpers.trainer import (
    CONFIGS,
    check,
    run_train,
    tensorboard_losses,
    tensorboard_scalars,
)
from torchtitan_upipe.titan.console import INAPPLICABLE

pytestmark = pytest.mark.slow

CONFIG = "llama3_debug_upipe.toml"
TOKENS_PER_STEP = 2 * 512  # local_batch_size x seq_len, one data-parallel rank (C = 2)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("first_hour")


def _run(workdir, name, *args, ok=True):
    proc = run_train(2, CONFIG, f"--job.dump_folder={workdir / name}", *args, cwd=workdir)
    if ok:
        check(proc)
    return proc


def _our_frames(text: str) -> list[str]:
    """Traceback frames from train.py or the package (torchrun's own frames are torch's)."""
    return [line for line in text.splitlines()
            if line.strip().startswith('File "') and ("torchtitan_upipe" in line or "train.py" in line)]


def test_the_main_job_prints_one_clean_log(workdir):
    proc = _run(workdir, "main", "--training.steps=3")
    out = proc.stdout + proc.stderr
    steps = re.findall(r"step: +(\d+) ", proc.stdout)
    assert steps == ["1", "2", "3"], proc.stdout[-3000:]  # once each: one rank logs
    assert out.count("Training starts at step 1") == 1
    assert "mfu" not in out and "tflops" not in out
    assert "MFU and TFLOP/s are not shown" in out
    for entry in INAPPLICABLE:
        assert not re.search(entry.pattern, out), entry.pattern
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]
    assert out.count("Initial weights depend on the world size on CPU") == 1
    tags = tensorboard_scalars(str(workdir / "main"), "n_tokens_seen")
    assert tags == {s: s * TOKENS_PER_STEP for s in (1, 2, 3)}  # TorchTitan's would be twice that
    assert not tensorboard_scalars(str(workdir / "main"), "mfu(%)")


def test_every_rank_logs_with_log_rank_all(workdir, monkeypatch):
    monkeypatch.setenv("LOG_RANK", "all")
    proc = _run(workdir, "all_ranks", "--training.steps=1")
    assert proc.stdout.count("Training starts at step 1") == 2


@pytest.mark.parametrize("args, message", [
    (("--training.seq_len=511",),
     "train.py: error: training.seq_len=511 is not divisible by parallelism.context_parallel_degree=2"),
    (("--memory.tiled_mlp", "--memory.mlp_tiles=300"),
     "train.py: error: memory.mlp_tiles=300 splits the sequence into more pieces than the 256 tokens"),
])
def test_a_user_error_is_one_line(workdir, args, message):
    proc = _run(workdir, "bad", *args, ok=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count(message) == 1, out[-3000:]
    assert not _our_frames(out), out[-3000:]
    assert "exitcode  : 2" in out  # torchrun's summary names our exit code


def test_an_unknown_toml_key_is_one_line(workdir):
    path = workdir / "typo.toml"
    shipped = (Path(CONFIGS) / CONFIG).read_text()
    path.write_text(shipped.replace("upipe_chunk_heads =", "chunk_heads ="))
    proc = run_train(2, str(path), f"--job.dump_folder={workdir / 'typo'}", cwd=workdir)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and not _our_frames(out), out[-3000:]
    assert out.count(f"train.py: error: {path}: [context_parallel] has no option 'chunk_heads' "
                     f"(did you mean 'upipe_chunk_heads'?)") == 1, out[-3000:]


def test_an_unknown_option_is_reported_once(workdir):
    proc = _run(workdir, "bad", "--nonsense.key=3", ok=False)
    assert proc.returncode != 0
    assert (proc.stdout + proc.stderr).count("Unrecognized options: --nonsense.key") == 1


# ---- resume and extend ------------------------------------------------------------------
CKPT = ("--checkpoint.enable",)


@pytest.fixture(scope="module")
def uninterrupted(workdir):
    """Six steps in one go: what a stopped and resumed six-step run must reproduce."""
    _run(workdir, "six", *CKPT, "--training.steps=6")
    return (tensorboard_losses(str(workdir / "six")), tensorboard_scalars(str(workdir / "six"), "lr"))


def test_a_planned_stop_continues_exactly(workdir, uninterrupted):
    losses, lrs = uninterrupted
    plan = ("--lr_scheduler.total_steps=6",)
    _run(workdir, "planned", *CKPT, *plan, "--training.steps=3")
    proc = _run(workdir, "planned", *CKPT, *plan, "--training.steps=6")
    assert "Loading the checkpoint from" in proc.stdout and "step-3" in proc.stdout
    got = tensorboard_losses(str(workdir / "planned"))
    assert sorted(got) == list(range(1, 7))
    assert [got[s] for s in (4, 5, 6)] == [losses[s] for s in (4, 5, 6)]  # bit for bit
    assert tensorboard_scalars(str(workdir / "planned"), "lr") == lrs
    assert tensorboard_scalars(str(workdir / "planned"), "n_tokens_seen")[6] == 6 * TOKENS_PER_STEP


def test_an_extension_is_refused_with_what_to_do_then_rebuilt(workdir, uninterrupted):
    _, lrs = uninterrupted
    _run(workdir, "extended", *CKPT, "--training.steps=3")
    proc = _run(workdir, "extended", *CKPT, "--training.steps=6", ok=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and not _our_frames(out)
    assert out.count("train.py: error: the checkpoint to resume from") == 1
    assert "(training.steps: 3 then, 6 now)" in out
    assert "checkpoint.on_schedule_change='rebuild'" in out and "step 4" in out
    assert "step:" not in proc.stdout  # refused before a step ran
    _run(workdir, "extended", *CKPT, "--training.steps=6", "--checkpoint.on_schedule_change=rebuild")
    got = tensorboard_scalars(str(workdir / "extended"), "lr")
    assert sorted(got) == list(range(1, 7))
    # steps 4-6 on the six-step schedule (TorchTitan would train step 4 at the old last LR, 0)
    assert [got[s] for s in (4, 5, 6)] == pytest.approx([lrs[s] for s in (4, 5, 6)], rel=1e-6)
    assert got[4] > 0


def test_a_weights_only_last_save_is_refused_by_name(workdir):
    _run(workdir, "model_only", *CKPT, "--checkpoint.last_save_model_only", "--training.steps=2")
    proc = _run(workdir, "model_only", *CKPT, "--training.steps=4", ok=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and not _our_frames(out)
    assert "holds the model weights only" in out and "--checkpoint.no_last_save_model_only" in out
    assert "Missing key" not in out


def test_a_checkpoint_of_another_model_is_one_line(workdir, uninterrupted):
    proc = _run(workdir, "six", *CKPT, "--training.steps=6", "--benchmark.n_layers=3", ok=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and not _our_frames(out), out[-3000:]
    assert out.count("train.py: error: the checkpoint ") == 1
    assert "is of another model: it holds layers.3." in out and "benchmark.n_layers=3" in out
