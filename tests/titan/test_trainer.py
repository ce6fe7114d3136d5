"""Trainer-level tests: the real TorchTitan trainer launched with torchrun on CPU/gloo.

Parity runs start from one seed checkpoint (TorchTitan initializes weights differently at
different world sizes) in float32 and compare the per-step losses TensorBoard recorded.
"""


import dataclasses
import functools

import pytest
import torch

from tests.helpers.trainer import (check, rank0_adam_bytes, run_train, tensorboard_losses,
                                   tensorboard_scalars)

pytestmark = pytest.mark.slow

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


def _losses(workdir, seed_checkpoint, name, nproc, config, *extra):
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
    return _losses(workdir, seed_checkpoint, "none", 1, "llama3_debug_none.toml", *PLAIN_TORCHTITAN)


def _assert_parity(a, b):
    worst = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    print(f"losses {[round(x, 6) for x in a]} vs {[round(y, 6) for y in b]}: max relative difference {worst:.2e}")
    for step, (x, y) in enumerate(zip(a, b), start=1):
        assert abs(x - y) <= 1e-5 * abs(y), f"step {step}: {x} vs {y} (all: {a} vs {b})"


@pytest.fixture(scope="module")
def ulysses_losses(workdir, seed_checkpoint):
    return _losses(workdir, seed_checkpoint, "ulysses", 2, "llama3_debug_ulysses.toml")


def test_ulysses_matches_single_device(ulysses_losses, reference_losses):
    _assert_parity(ulysses_losses, reference_losses)
    assert reference_losses[-1] < reference_losses[0]  # it trains


def test_no_cp_style_matches_plain_torchtitan(workdir, seed_checkpoint, reference_losses):
    """style='none' through this plugin's train spec and trainer: TorchTitan's attention."""
    none = _losses(workdir, seed_checkpoint, "plugin_none", 1, "llama3_debug_none.toml")
    _assert_parity(none, reference_losses)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="TorchTitan's ring attention (style='ring') needs 2 CUDA devices")
def test_torchtitan_ring_matches_single_device(workdir, seed_checkpoint, reference_losses):
    ring = _losses(workdir, seed_checkpoint, "ring", 2, "llama3_debug_ulysses.toml",
                   "--context_parallel.style=ring")
    _assert_parity(ring, reference_losses)


def test_upipe_matches_ulysses(workdir, seed_checkpoint, reference_losses, ulysses_losses):
    ulysses = ulysses_losses
    upipe = _losses(workdir, seed_checkpoint, "upipe", 2, "llama3_debug_upipe.toml")
    _assert_parity(upipe, ulysses)
    _assert_parity(upipe, reference_losses)
    # TensorBoard also carries the attention share of step time for CP styles
    share = tensorboard_scalars(str(workdir / "upipe"), "time_metrics/attention(%)")
    assert sorted(share) == list(range(1, STEPS + 1)) and all(0 < v < 100 for v in share.values()), share


def test_upipe_with_full_activation_checkpointing_and_larger_chunks(workdir, seed_checkpoint, reference_losses):
    upipe = _losses(
        workdir, seed_checkpoint, "upipe_ac", 2, "llama3_debug_upipe.toml",
        "--activation_checkpoint.mode=full", "--context_parallel.upipe_chunk_heads=4",
    )
    _assert_parity(upipe, reference_losses)


def test_bad_option_fails_before_training(workdir):
    proc = run_train(2, "llama3_debug_upipe.toml", "--context_parallel.upipe_chunk_heads=3",
                     f"--job.dump_folder={workdir / 'bad'}", cwd=workdir, timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "context_parallel.upipe_chunk_heads=3" in out
    assert "step:" not in out and "Building upipe_llama3" not in out


@pytest.fixture(scope="module")
def memory_stack_losses(workdir, seed_checkpoint):
    return _losses(workdir, seed_checkpoint, "upipe_memory_stack", 2, "llama3_debug_upipe_memory.toml")


def test_memory_stack_matches_plain_training(workdir, memory_stack_losses, reference_losses):
    """Offloaded full AC + tiled MLP/RMSNorm + chunked loss under FSDP and UPipe: same losses."""
    stacked = memory_stack_losses
    _assert_parity(stacked, reference_losses)
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
    host = _losses(workdir, seed_checkpoint, "upipe_keep_host", 2,
                   "llama3_debug_upipe_memory.toml", "--memory.keep_attention_output=host")
    assert host == memory_stack_losses
    offloaded = tensorboard_scalars(str(workdir / "upipe_keep_host"), "memory/host_offload(GiB)")
    inputs, results = 5 * 2 * 128 * 256 * 4, 6 * 2 * 128 * 16 * (16 * 4 + 4)
    assert set(offloaded.values()) == {(inputs + results) / 2**30}, offloaded
    device = _losses(workdir, seed_checkpoint, "ulysses_keep_device", 2,
                     "llama3_debug_ulysses.toml", "--activation_checkpoint.mode=full",
                     "--memory.offload_activations", "--memory.keep_attention_output=device")
    _assert_parity(device, ulysses_losses)


def test_optimizer_state_on_the_host_refetched_inputs_and_inplace_grads_change_no_loss(
        workdir, seed_checkpoint, memory_stack_losses):
    """memory.offload_optimizer_state (FSDP's DTensor state, 2 ranks) with
    memory.offload_refetch_input, memory.offload_inplace_residual_grads (tiled norms: the same
    additions) and every layer offloaded, under the trainer: the memory stack's losses bit for
    bit; the host holds rank 0's Adam state from step 2 on (step 1's optimizer step creates it)."""
    name = "upipe_optimizer_host"
    losses = _losses(workdir, seed_checkpoint, name, 2, "llama3_debug_upipe_memory.toml",
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
    stacked = _losses(workdir, seed_checkpoint, "upipe_fused_wo", 2,
                      "llama3_debug_upipe_memory.toml", "--memory.fuse_output_projection",
                      "--memory.keep_attention_output=host")
    _assert_parity(stacked, memory_stack_losses)
    ring = _losses(workdir, seed_checkpoint, "upipe2x2_fused_wo", 4, "llama3_debug_upipe.toml",
                   "--parallelism.context_parallel_degree=4", "--context_parallel.ulysses_degree=2",
                   "--memory.fuse_output_projection")
    _assert_parity(ring, reference_losses)


def test_segment_checkpointing_changes_no_loss(workdir, seed_checkpoint, memory_stack_losses):
    """memory.offload_stride = 3 under the trainer (FSDP2 on 2 ranks: the regenerating
    forwards gather each block's shards themselves), all 6 layers offloaded, with refetched
    inputs and in-place residual gradients: the memory stack's losses bit for bit, and the
    host holds 2 segment inputs and 2 scratch buffers instead of 5 inputs."""
    name = "upipe_stride3"
    losses = _losses(workdir, seed_checkpoint, name, 2, "llama3_debug_upipe_memory.toml",
                     "--memory.offload_keep_layers=0", "--memory.offload_stride=3",
                     "--memory.offload_refetch_input", "--memory.offload_inplace_residual_grads")
    assert losses == memory_stack_losses
    host = tensorboard_scalars(str(workdir / name), "memory/host_offload(GiB)")
    assert set(host.values()) == {4 * 2 * 128 * 256 * 4 / 2**30}, host


CP4 = ("--parallelism.context_parallel_degree=4",)


def test_hybrids_match_ulysses_and_single_device(workdir, seed_checkpoint, reference_losses):
    """usp 2x2 (all-to-all 2 x ring 2, zigzag) vs ulysses 4x1 vs none, and UPipe x ring 2x2."""
    ulysses = _losses(workdir, seed_checkpoint, "ulysses4", 4, "llama3_debug_ulysses.toml", *CP4)
    usp = _losses(workdir, seed_checkpoint, "usp2x2", 4, "llama3_debug_ulysses.toml", *CP4,
                  "--context_parallel.style=usp", "--context_parallel.ulysses_degree=2")
    upipe_ring = _losses(workdir, seed_checkpoint, "upipe2x2", 4, "llama3_debug_upipe.toml", *CP4,
                         "--context_parallel.ulysses_degree=2")
    _assert_parity(ulysses, reference_losses)
    _assert_parity(usp, ulysses)
    _assert_parity(upipe_ring, reference_losses)


def test_upipe_checkpoint_loads_into_plain_torchtitan(workdir, seed_checkpoint, reference_losses):
    """Train with UPipe, save a DCP checkpoint, continue from it in plain TorchTitan and in UPipe."""
    dump = workdir / "upipe_save"
    check(run_train(
        2, "llama3_debug_upipe.toml", f"--job.dump_folder={dump}", "--checkpoint.enable",
        f"--checkpoint.initial_load_path={seed_checkpoint}", "--checkpoint.interval=1000",
        *COMMON, cwd=workdir,
    ))
    trained = dump / "checkpoint" / f"step-{STEPS}"
    assert trained.is_dir()
    plain = _losses(workdir, str(trained), "plain_from_upipe", 1, "llama3_debug_none.toml", *PLAIN_TORCHTITAN)
    upipe = _losses(workdir, str(trained), "upipe_from_upipe", 2, "llama3_debug_upipe.toml")
    _assert_parity(upipe, plain)
    # the trained weights were loaded: the first loss is far below the untrained model's
    assert plain[0] < reference_losses[0] - 0.1, (plain[0], reference_losses[0])


def test_upipe_under_torch_compile(workdir, seed_checkpoint, reference_losses):
    """Per-block fullgraph compile (inductor) around the opaque UPipe custom op."""
    compiled = _losses(workdir, seed_checkpoint, "upipe_compiled", 2, "llama3_debug_upipe.toml",
                       "--compile.enable", "--context_parallel.no-time-attention")
    _assert_parity(compiled, reference_losses)


@pytest.mark.parametrize("bound", [True, False])
def test_the_trainer_hands_its_plan_to_the_parallelize_hook(bound):
    """TorchTitan's Trainer assigns ``train_spec`` and calls its ``parallelize_fn``; the
    trainer binds its CPPlan to this plugin's hook and leaves any other hook alone."""
    from torchtitan_upipe.titan.parallelize import parallelize_llama_cp
    from torchtitan_upipe.titan.train_spec import get_train_spec
    from torchtitan_upipe.titan.trainer import UPipeTrainer

    trainer = object.__new__(UPipeTrainer)  # the binding alone: no distributed, no model
    trainer.plan = object()
    spec = get_train_spec()
    if not bound:
        spec = dataclasses.replace(spec, parallelize_fn=lambda *a: None)
    trainer.train_spec = spec
    fn = trainer.train_spec.parallelize_fn
    if bound:
        assert isinstance(fn, functools.partial) and fn.func is parallelize_llama_cp
        assert fn.keywords == {"plan": trainer.plan}
    else:
        assert fn is spec.parallelize_fn


def test_the_main_job_prints_the_same_losses_twice(workdir):
    """The README's main job as it ships (its config's seed, 3 of its steps): same losses."""
    runs = []
    for name in ("main_a", "main_b"):
        dump = workdir / name
        check(run_train(2, "llama3_debug_upipe.toml", f"--job.dump_folder={dump}",
                        "--training.steps=3", cwd=workdir))
        runs.append(tensorboard_losses(str(dump)))
    assert runs[0] == runs[1] and sorted(runs[0]) == [1, 2, 3], runs


def test_the_device_cap_is_a_fraction_of_a_larger_device_and_nothing_otherwise():
    from torchtitan_upipe.titan.trainer import cap_device_memory, memory_fraction

    h200 = 150_109_880_320  # bytes torch reports for an H200
    assert memory_fraction(80, h200) == pytest.approx(80 * 2**30 / h200)
    assert memory_fraction(80, 85_520_809_984) is None  # an H100 (79.65 GiB): no cap
    assert memory_fraction(0, h200) is None
    if not torch.cuda.is_available():
        assert cap_device_memory(80) is None  # nothing to cap on CPU


def test_padding_an_uneven_length_matches_the_unpadded_single_device_run(workdir, seed_checkpoint):
    """training.seq_len = 509 with context_parallel.pad_seq_len: each sample padded to 510 (upipe
    C=2), 512 (usp, a ring of 2: multiples of 2C) or 512 (upipe C=4 on 4 ranks), against 509
    tokens on one rank without CP (style 'none': TorchTitan's attention, as
    test_no_cp_style_matches_plain_torchtitan shows; plain TorchTitan itself asserts an even
    seq_len)."""
    odd = ("--training.seq_len=509",)
    reference = _losses(workdir, seed_checkpoint, "none_509", 1, "llama3_debug_none.toml", *odd)
    pad = ("--context_parallel.pad_seq_len",)
    for name, nproc, config, extra in [
        ("upipe_pad", 2, "llama3_debug_upipe.toml", ()),
        ("usp_pad", 2, "llama3_debug_upipe_memory.toml",
         ("--context_parallel.style=usp", "--context_parallel.ulysses_degree=1")),
        ("upipe_c4_pad", 4, "llama3_debug_upipe.toml", ("--parallelism.context_parallel_degree=4",)),
    ]:
        _assert_parity(_losses(workdir, seed_checkpoint, name, nproc, config, *odd, *pad, *extra),
                       reference)
    tokens = tensorboard_scalars(str(workdir / "upipe_pad"), "n_tokens_seen")
    assert tokens[STEPS] == STEPS * 2 * 509  # padding is not counted


def test_pad_to_pads_inputs_and_ignores_the_padded_labels():
    from torchtitan_upipe.memory import IGNORE_INDEX
    from torchtitan_upipe.titan.trainer import pad_to

    inputs, labels = torch.arange(10).view(2, 5), torch.arange(10, 20).view(2, 5)
    got, got_labels = pad_to(8, {"input": inputs, "other": 1}, labels)
    assert got["other"] == 1 and got["input"].shape == (2, 8) and got_labels.shape == (2, 8)
    assert torch.equal(got["input"][:, :5], inputs) and torch.equal(got_labels[:, :5], labels)
    assert (got["input"][:, 5:] == 0).all() and (got_labels[:, 5:] == IGNORE_INDEX).all()
    same, same_labels = pad_to(5, {"input": inputs}, labels)
    assert same["input"] is inputs and same_labels is labels
