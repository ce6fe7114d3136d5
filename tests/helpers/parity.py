"""Loss parity under the real trainer: one seed checkpoint, per-step losses from TensorBoard.

TorchTitan initializes weights differently at different world sizes, so every run loads
the seed checkpoint plain TorchTitan wrote on one rank and trains ``STEPS`` steps in float32.
The fixtures are module-scoped: a test module imports the ones it uses, and each module
builds its own seed checkpoint and references once (tests/titan/test_trainer.py,
tests/titan/test_trainer_memory.py).
"""

from __future__ import annotations

import pytest

from tests.helpers.trainer import check, run_train, tensorboard_losses

STEPS = 5
COMMON = (
    f"--training.steps={STEPS}",
    "--training.seq_len=256",
    "--training.local_batch_size=2",
    "--training.mixed_precision_param=float32",
    "--debug.seed=0",
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("trainer")


PLAIN_TORCHTITAN = ("--model.name=llama3",)  # TorchTitan's own Llama3 train spec and model


@pytest.fixture(scope="module")
def seed_checkpoint(workdir):
    """Initial weights written by plain TorchTitan: every CP run loads a TorchTitan checkpoint."""
    from torchtitan_upipe.titan.data import ensure_debug_tokenizer

    ensure_debug_tokenizer(str(workdir / "outputs" / "assets" / "upipe_debug_tokenizer"))
    dump = workdir / "seed"
    check(run_train(
        1, "llama3_debug_none.toml", f"--job.dump_folder={dump}", "--checkpoint.enable",
        "--checkpoint.create_seed_checkpoint", *PLAIN_TORCHTITAN, *COMMON, cwd=workdir,
    ))
    path = dump / "checkpoint" / "step-0"
    assert path.is_dir()
    return str(path)


def train_losses(workdir, seed_checkpoint, name, nproc, config, *extra):
    dump = workdir / name
    check(run_train(
        nproc, config, f"--job.dump_folder={dump}", "--checkpoint.enable",
        f"--checkpoint.initial_load_path={seed_checkpoint}", "--checkpoint.interval=1000",
        *COMMON, *extra, cwd=workdir,
    ))
    losses = tensorboard_losses(str(dump))
    assert sorted(losses) == list(range(1, STEPS + 1)), losses
    return [losses[s] for s in range(1, STEPS + 1)]


@pytest.fixture(scope="module")
def reference_losses(workdir, seed_checkpoint):
    """Plain TorchTitan (its model, parallelize and loss) on one rank."""
    return train_losses(workdir, seed_checkpoint, "none", 1, "llama3_debug_none.toml", *PLAIN_TORCHTITAN)


def assert_parity(a, b):
    worst = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    print(f"losses {[round(x, 6) for x in a]} vs {[round(y, 6) for y in b]}: max relative difference {worst:.2e}")
    for step, (x, y) in enumerate(zip(a, b), start=1):
        assert abs(x - y) <= 1e-5 * abs(y), f"step {step}: {x} vs {y} (all: {a} vs {b})"


@pytest.fixture(scope="module")
def ulysses_losses(workdir, seed_checkpoint):
    return train_losses(workdir, seed_checkpoint, "ulysses", 2, "llama3_debug_ulysses.toml")
