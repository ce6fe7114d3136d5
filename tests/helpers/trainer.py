"""Run ``train.py`` under torchrun in a subprocess and read its TensorBoard losses."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

from tests.helpers.paths import ROOT
CONFIGS = os.path.join(ROOT, "train_configs")


def train_command(nproc: int, config: str, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", f"--nproc_per_node={nproc}",  # torchrun picks a free port itself
        os.path.join(ROOT, "train.py"),
        "--job.config_file", os.path.join(CONFIGS, config), *overrides,
    ]


def train_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run_train(nproc: int, config: str, *overrides: str, cwd: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(nproc, config, *overrides), cwd=cwd, env=train_env(),
                          capture_output=True, text=True, timeout=timeout)


def check(proc: subprocess.CompletedProcess) -> None:
    if proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")


def tensorboard_scalars(dump_folder: str, tag: str) -> dict[int, float]:
    """``{step: value}`` of one scalar from the run's TensorBoard event file(s)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    files = glob.glob(os.path.join(dump_folder, "tb", "**", "events.out.tfevents.*"), recursive=True)
    assert files, f"no TensorBoard events under {dump_folder}/tb"
    for path in files:
        acc = EventAccumulator(path)
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({ev.step: ev.value for ev in acc.Scalars(tag)})
    return values


def tensorboard_losses(dump_folder: str) -> dict[int, float]:
    """``{step: global_avg_loss}`` from the run's TensorBoard event file(s)."""
    return tensorboard_scalars(dump_folder, "loss_metrics/global_avg_loss")


def rank0_adam_bytes(flavor: str, world: int) -> int:
    """exp_avg + exp_avg_sq (fp32) of rank 0's FSDP shards of TorchTitan's Llama3 ``flavor``:
    FSDP2 chunks dim 0 as ``torch.chunk`` does, so rank 0 holds ``ceil(rows / world)`` rows."""
    import torch
    from torchtitan.models.llama3 import Transformer, llama3_args

    with torch.device("meta"):
        model = Transformer(llama3_args[flavor])
    return sum(2 * 4 * (-(-p.shape[0] // world)) * (p.numel() // p.shape[0])
               for p in model.parameters())
