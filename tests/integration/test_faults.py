"""A rank that dies mid-step ends the job, and the job continues from its last checkpoint.

torchrun, CPU, gloo, 2 ranks. Rank 1 is killed with SIGKILL after step 3 has been logged;
the job must end within a minute with a non-zero exit and torchrun's report naming the killed
rank, not hang in a collective. Started again with the same command, it resumes from its last
checkpoint, and the steps from there give the losses of a run that was never killed, bit for bit.
"""

import os
import signal
import subprocess
import time

import pytest

from tests.helpers.trainer import (
    check,
    run_train,
    tensorboard_losses,
    train_command,
    train_env,
)

pytestmark = pytest.mark.slow

CONFIG = "llama3_debug_upipe.toml"
ARGS = ("--checkpoint.enable", "--checkpoint.interval=2", "--training.steps=8")


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def _local_rank(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    except OSError:
        return None
    rank = env.get(b"LOCAL_RANK")
    return None if rank is None else int(rank)


def test_a_killed_rank_ends_the_job_and_the_job_resumes(tmp_path):
    dump = tmp_path / "killed"
    proc = subprocess.Popen(train_command(2, CONFIG, f"--job.dump_folder={dump}", *ARGS),
                            cwd=tmp_path, env=train_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "step:  3" in line:
                break
        victims = [c for c in _children(proc.pid) if _local_rank(c) == 1]
        assert victims, "".join(lines[-20:])
        os.kill(victims[0], signal.SIGKILL)
        killed_at = time.monotonic()
        rest = proc.communicate(timeout=120)[0]
        took = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines) + rest
    assert proc.returncode != 0
    assert took < 60, f"the job took {took:.0f} s to end after a rank died"
    assert "exitcode  : -9" in out and "local_rank: 1" in out, out[-3000:]

    resumed = run_train(2, CONFIG, f"--job.dump_folder={dump}", *ARGS, cwd=tmp_path)
    check(resumed)
    assert "Loading the checkpoint from" in resumed.stdout
    start = int(resumed.stdout.split("Training starts at step ")[1].split()[0])
    assert start in (3, 4, 5), start  # after the last save (step 2 or 4), before the end
    never_killed = tmp_path / "never_killed"
    check(run_train(2, CONFIG, f"--job.dump_folder={never_killed}", *ARGS, cwd=tmp_path))
    reference, got = tensorboard_losses(str(never_killed)), tensorboard_losses(str(dump))
    assert sorted(got) == list(range(1, 9))
    assert [got[s] for s in range(start, 9)] == [reference[s] for s in range(start, 9)]
