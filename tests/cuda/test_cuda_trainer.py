"""The real trainer on one GPU: the memory stack on and off, same seed, same losses.

Both runs are TorchTitan's debug Llama3 on one rank in float32 (no context parallelism: one
GPU cannot hold two NCCL ranks), from ``--debug.seed=0``: full activation checkpointing with
the block inputs offloaded to page-locked host buffers, tiled MLP and RMSNorm and the
chunked loss against plain training.  The offloaded bytes logged are exactly the inputs'.
Skipped without CUDA.
"""

from __future__ import annotations

import pytest

from tests.helpers.cuda import CUDA
from tests.helpers.trainer import check, run_train, tensorboard_losses, tensorboard_scalars

pytestmark = [*CUDA, pytest.mark.slow]

STEPS, SEQ, BATCH, DIM, LAYERS = 5, 512, 2, 256, 6
COMMON = (f"--training.steps={STEPS}", f"--training.seq_len={SEQ}",
          f"--training.local_batch_size={BATCH}", "--debug.seed=0")
STACK = ("--activation_checkpoint.mode=full", "--memory.offload_activations",
         "--memory.tiled_mlp", "--memory.tiled_norm", "--memory.chunked_loss")


def _run(workdir, name, *extra):
    dump = workdir / name
    check(run_train(1, "llama3_debug_none.toml", f"--job.dump_folder={dump}", *COMMON, *extra,
                    cwd=workdir))
    losses = tensorboard_losses(str(dump))
    assert sorted(losses) == list(range(1, STEPS + 1)), losses
    return dump, [losses[s] for s in range(1, STEPS + 1)]


def test_memory_stack_matches_plain_training_on_one_gpu(tmp_path):
    from torchtitan_upipe.titan.data import ensure_debug_tokenizer

    ensure_debug_tokenizer(str(tmp_path / "outputs" / "assets" / "upipe_debug_tokenizer"))
    _, plain = _run(tmp_path, "plain")
    dump, stacked = _run(tmp_path, "stack", *STACK)
    print(f"losses: plain {plain}, stack {stacked}")
    for step, (a, b) in enumerate(zip(stacked, plain), start=1):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: {a} vs {b} (all: {stacked} vs {plain})"
    assert plain[-1] < plain[0]
    exact = (LAYERS - 1) * BATCH * SEQ * DIM * 4 / 2**30  # 5 offloaded float32 block inputs
    host = tensorboard_scalars(str(dump), "memory/host_offload(GiB)")
    pinned = tensorboard_scalars(str(dump), "memory/host_pinned(GiB)")
    assert set(host.values()) == {exact}, host
    assert set(pinned.values()) == {exact}, pinned  # page-locked, at exactly their size
