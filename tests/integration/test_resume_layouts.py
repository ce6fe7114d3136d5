"""Exact resume, and checkpoints that do not depend on the CP layout (torchrun, CPU, gloo, fp32).

A six-step run saves a DCP checkpoint every 3 steps. Its step-3 checkpoint, copied into a new
folder, is what a run killed after step 3 leaves behind; the same command started there
resumes from it:

* with the same style and options, steps 4-6 give the uninterrupted run's losses bit for bit
  (upipe, ulysses and usp, the memory stack off and on): model, optimizer, LR scheduler, data
  position and step are all restored, and nothing else carries state between steps;
* under another layout (upipe C=2 -> ulysses C=2, -> no CP on 1 rank, -> upipe C=4 on 4 ranks)
  the losses continue as if nothing changed, to 1e-5 relative: the checkpoint holds the plain
  Llama3 state (FSDP shards are resharded by DCP), and only the order of fp32 reductions
  differs between layouts (the same bound as the parity tests in ``tests/titan/test_trainer.py``).
"""

import shutil

import pytest

from tests.helpers.trainer import check, run_train, tensorboard_losses, tensorboard_scalars

pytestmark = pytest.mark.slow

COMMON = ("--checkpoint.enable", "--checkpoint.interval=3", "--training.steps=6")
STACK = "llama3_debug_upipe_memory.toml"  # the whole memory stack on
USP = ("--context_parallel.style=usp", "--context_parallel.ulysses_degree=1")  # a pure ring of 2

JOBS = {  # name: (ranks, config, options)
    "upipe": (2, "llama3_debug_upipe.toml", ()),
    "upipe_stack": (2, STACK, ()),
    "ulysses": (2, "llama3_debug_ulysses.toml", ()),
    "usp_stack": (2, STACK, USP),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("resume_layouts")


@pytest.fixture(scope="module")
def uninterrupted(workdir):
    """name -> (losses of steps 1-6, folder); each job run once, six steps in one go."""
    runs = {}

    def get(name):
        if name not in runs:
            nproc, config, options = JOBS[name]
            dump = workdir / f"{name}_full"
            check(run_train(nproc, config, f"--job.dump_folder={dump}", *COMMON, *options, cwd=workdir))
            assert (dump / "checkpoint" / "step-3").is_dir()
            runs[name] = tensorboard_losses(str(dump)), dump
        return runs[name]

    return get


def _resume_from_step_3(workdir, source, name, nproc, config, *options):
    """Steps 4-6 of ``config`` started in a folder that holds ``source``'s step-3 checkpoint."""
    dump = workdir / name
    shutil.copytree(source / "checkpoint" / "step-3", dump / "checkpoint" / "step-3")
    proc = run_train(nproc, config, f"--job.dump_folder={dump}", *COMMON, *options, cwd=workdir)
    check(proc)
    assert "Loading the checkpoint from" in proc.stdout
    losses = tensorboard_losses(str(dump))
    assert sorted(losses) == [4, 5, 6], losses
    tokens = tensorboard_scalars(str(dump), "n_tokens_seen")
    assert tokens[6] == 6 * 2 * 512, tokens  # counted once per token, and carried over
    return losses


@pytest.mark.parametrize("name", sorted(JOBS))
def test_resume_is_exact(workdir, uninterrupted, name):
    full, dump = uninterrupted(name)
    nproc, config, options = JOBS[name]
    resumed = _resume_from_step_3(workdir, dump, f"{name}_resumed", nproc, config, *options)
    assert [resumed[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)], (resumed, full)


@pytest.mark.parametrize("name, nproc, config, options", [
    ("to_ulysses", 2, "llama3_debug_ulysses.toml", ()),
    ("to_none", 1, "llama3_debug_none.toml", ()),
    ("to_upipe_c4", 4, "llama3_debug_upipe.toml", ("--parallelism.context_parallel_degree=4",)),
])
def test_a_checkpoint_resumes_under_another_layout(workdir, uninterrupted, name, nproc, config,
                                                   options):
    full, dump = uninterrupted("upipe")
    resumed = _resume_from_step_3(workdir, dump, name, nproc, config, *options)
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5), (step, resumed, full)
