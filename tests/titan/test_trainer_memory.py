"""The memory options under the real trainer (torchrun, CPU/gloo, FSDP on 2 ranks): the
memory stack, kept attention results, the optimizer state on the host, refetched inputs,
in-place residual gradients, the fused output projection and segment checkpointing change
no loss (bit for bit where the arithmetic is the same, within the parity bound where it is
split differently).  Every gradient of each option, in fp64: tests/titan/test_memory_stack.py.
"""

import pytest

from tests.helpers.parity import (  # noqa: F401  (fixtures: pytest finds them in the module)
    STEPS, assert_parity, reference_losses, seed_checkpoint, train_losses, ulysses_losses,
    workdir)
from tests.helpers.trainer import rank0_adam_bytes, tensorboard_scalars

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def memory_stack_losses(workdir, seed_checkpoint):
    return train_losses(workdir, seed_checkpoint, "upipe_memory_stack", 2, "llama3_debug_upipe_memory.toml")


def test_memory_stack_matches_plain_training(workdir, memory_stack_losses, reference_losses):
    """Offloaded full AC + tiled MLP/RMSNorm + chunked loss under FSDP and UPipe: same losses."""
    stacked = memory_stack_losses
    assert_parity(stacked, reference_losses)
    # the host buffers are logged at exactly their size: 5 offloaded layers x (2, 128, 256) fp32
    host = tensorboard_scalars(str(workdir / "upipe_memory_stack"), "memory/host_offload(GiB)")
    pinned = tensorboard_scalars(str(workdir / "upipe_memory_stack"), "memory/host_pinned(GiB)")
    assert set(host.values()) == {5 * 2 * 128 * 256 * 4 / 2**30}, host
    assert set(pinned.values()) == {0.0}, pinned  # nothing is page-locked without CUDA


def test_kept_attention_outputs_change_no_loss(workdir, seed_checkpoint, memory_stack_losses,
                                               ulysses_losses):
    """memory.keep_attention_output under the trainer: UPipe with the results on the host
    gives the memory stack's losses bit for bit, and host memory holds them next to the
    inputs; Ulysses with them on the device matches Ulysses without the stack.  (Every
    gradient, and usp and UPipe x ring on 4 ranks: tests/titan/test_memory_stack.py.)"""
    host = train_losses(workdir, seed_checkpoint, "upipe_keep_host", 2,
                        "llama3_debug_upipe_memory.toml", "--memory.keep_attention_output=host")
    assert host == memory_stack_losses
    offloaded = tensorboard_scalars(str(workdir / "upipe_keep_host"), "memory/host_offload(GiB)")
    inputs, results = 5 * 2 * 128 * 256 * 4, 6 * 2 * 128 * 16 * (16 * 4 + 4)
    assert set(offloaded.values()) == {(inputs + results) / 2**30}, offloaded
    device = train_losses(workdir, seed_checkpoint, "ulysses_keep_device", 2,
                          "llama3_debug_ulysses.toml", "--activation_checkpoint.mode=full",
                          "--memory.offload_activations", "--memory.keep_attention_output=device")
    assert_parity(device, ulysses_losses)


def test_optimizer_state_on_the_host_refetched_inputs_and_inplace_grads_change_no_loss(
        workdir, seed_checkpoint, memory_stack_losses):
    """memory.offload_optimizer_state (FSDP's DTensor state, 2 ranks) with
    memory.offload_refetch_input, memory.offload_inplace_residual_grads (tiled norms: the same
    additions) and every layer offloaded, under the trainer: the memory stack's losses bit for
    bit; the host holds rank 0's Adam state from step 2 on (step 1's optimizer step creates it)."""
    name = "upipe_optimizer_host"
    losses = train_losses(workdir, seed_checkpoint, name, 2, "llama3_debug_upipe_memory.toml",
                          "--memory.offload_optimizer_state", "--memory.offload_refetch_input",
                          "--memory.offload_inplace_residual_grads", "--memory.offload_keep_layers=0")
    assert losses == memory_stack_losses
    host = tensorboard_scalars(str(workdir / name), "memory/host_optimizer(GiB)")
    state = rank0_adam_bytes("debugmodel", 2) / 2**30
    assert host == {1: 0.0, **{s: state for s in range(2, STEPS + 1)}}, (host, state)


def test_fused_output_projection_changes_no_loss(workdir, seed_checkpoint, memory_stack_losses,
                                                reference_losses):
    """memory.fuse_output_projection under the trainer (FSDP, the checkpoint's wo): with the
    memory stack and kept results on 2 ranks the memory stack's losses, and UPipe x ring 2x2
    on 4 ranks plain training's, both within the parity bound (the backward's GEMMs are split
    by columns: equal within rounding, not bit for bit)."""
    stacked = train_losses(workdir, seed_checkpoint, "upipe_fused_wo", 2,
                           "llama3_debug_upipe_memory.toml", "--memory.fuse_output_projection",
                           "--memory.keep_attention_output=host")
    assert_parity(stacked, memory_stack_losses)
    ring = train_losses(workdir, seed_checkpoint, "upipe2x2_fused_wo", 4, "llama3_debug_upipe.toml",
                        "--parallelism.context_parallel_degree=4", "--context_parallel.ulysses_degree=2",
                        "--memory.fuse_output_projection")
    assert_parity(ring, reference_losses)


def test_segment_checkpointing_changes_no_loss(workdir, seed_checkpoint, memory_stack_losses):
    """memory.offload_stride = 3 under the trainer (FSDP2 on 2 ranks: the regenerating
    forwards gather each block's shards themselves), all 6 layers offloaded, with refetched
    inputs and in-place residual gradients: the memory stack's losses bit for bit, and the
    host holds 2 segment inputs and 2 scratch buffers instead of 5 inputs."""
    name = "upipe_stride3"
    losses = train_losses(workdir, seed_checkpoint, name, 2, "llama3_debug_upipe_memory.toml",
                          "--memory.offload_keep_layers=0", "--memory.offload_stride=3",
                          "--memory.offload_refetch_input", "--memory.offload_inplace_residual_grads")
    assert losses == memory_stack_losses
    host = tensorboard_scalars(str(workdir / name), "memory/host_offload(GiB)")
    assert set(host.values()) == {4 * 2 * 128 * 256 * 4 / 2**30}, host
