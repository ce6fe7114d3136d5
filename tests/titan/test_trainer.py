"""Trainer-level tests: the real TorchTitan trainer launched with torchrun on CPU/gloo.

Parity runs start from one seed checkpoint (TorchTitan initializes weights differently at
different world sizes) in float32 and compare the per-step losses TensorBoard recorded
(tests/helpers/parity.py).  The memory options under the trainer: test_trainer_memory.py.
"""


import dataclasses
import functools

import pytest
import torch

from tests.helpers.parity import (  # noqa: F401  (fixtures: pytest finds them in the module)
    COMMON, PLAIN_TORCHTITAN, STEPS, assert_parity, reference_losses, seed_checkpoint,
    train_losses, ulysses_losses, workdir)
from tests.helpers.trainer import check, run_train, tensorboard_losses, tensorboard_scalars

pytestmark = pytest.mark.slow

def test_ulysses_matches_single_device(ulysses_losses, reference_losses):
    assert_parity(ulysses_losses, reference_losses)
    assert reference_losses[-1] < reference_losses[0]  # it trains


def test_no_cp_style_matches_plain_torchtitan(workdir, seed_checkpoint, reference_losses):
    """style='none' through this plugin's train spec and trainer: TorchTitan's attention."""
    none = train_losses(workdir, seed_checkpoint, "plugin_none", 1, "llama3_debug_none.toml")
    assert_parity(none, reference_losses)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="TorchTitan's ring attention (style='ring') needs 2 CUDA devices")
def test_torchtitan_ring_matches_single_device(workdir, seed_checkpoint, reference_losses):
    ring = train_losses(workdir, seed_checkpoint, "ring", 2, "llama3_debug_ulysses.toml",
                        "--context_parallel.style=ring")
    assert_parity(ring, reference_losses)


def test_upipe_matches_ulysses(workdir, seed_checkpoint, reference_losses, ulysses_losses):
    ulysses = ulysses_losses
    upipe = train_losses(workdir, seed_checkpoint, "upipe", 2, "llama3_debug_upipe.toml")
    assert_parity(upipe, ulysses)
    assert_parity(upipe, reference_losses)
    # TensorBoard also carries the attention share of step time for CP styles
    share = tensorboard_scalars(str(workdir / "upipe"), "time_metrics/attention(%)")
    assert sorted(share) == list(range(1, STEPS + 1)) and all(0 < v < 100 for v in share.values()), share


def test_upipe_with_full_activation_checkpointing_and_larger_chunks(workdir, seed_checkpoint, reference_losses):
    upipe = train_losses(
        workdir, seed_checkpoint, "upipe_ac", 2, "llama3_debug_upipe.toml",
        "--activation_checkpoint.mode=full", "--context_parallel.upipe_chunk_heads=4",
    )
    assert_parity(upipe, reference_losses)


def test_bad_option_fails_before_training(workdir):
    proc = run_train(2, "llama3_debug_upipe.toml", "--context_parallel.upipe_chunk_heads=3",
                     f"--job.dump_folder={workdir / 'bad'}", cwd=workdir, timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "context_parallel.upipe_chunk_heads=3" in out
    assert "step:" not in out and "Building upipe_llama3" not in out


CP4 = ("--parallelism.context_parallel_degree=4",)


def test_hybrids_match_ulysses_and_single_device(workdir, seed_checkpoint, reference_losses):
    """usp 2x2 (all-to-all 2 x ring 2, zigzag) vs ulysses 4x1 vs none, and UPipe x ring 2x2."""
    ulysses = train_losses(workdir, seed_checkpoint, "ulysses4", 4, "llama3_debug_ulysses.toml", *CP4)
    usp = train_losses(workdir, seed_checkpoint, "usp2x2", 4, "llama3_debug_ulysses.toml", *CP4,
                       "--context_parallel.style=usp", "--context_parallel.ulysses_degree=2")
    upipe_ring = train_losses(workdir, seed_checkpoint, "upipe2x2", 4, "llama3_debug_upipe.toml", *CP4,
                              "--context_parallel.ulysses_degree=2")
    assert_parity(ulysses, reference_losses)
    assert_parity(usp, ulysses)
    assert_parity(upipe_ring, reference_losses)


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
    plain = train_losses(workdir, str(trained), "plain_from_upipe", 1, "llama3_debug_none.toml", *PLAIN_TORCHTITAN)
    upipe = train_losses(workdir, str(trained), "upipe_from_upipe", 2, "llama3_debug_upipe.toml")
    assert_parity(upipe, plain)
    # the trained weights were loaded: the first loss is far below the untrained model's
    assert plain[0] < reference_losses[0] - 0.1, (plain[0], reference_losses[0])


def test_upipe_under_torch_compile(workdir, seed_checkpoint, reference_losses):
    """Per-block fullgraph compile (inductor) around the opaque UPipe custom op."""
    compiled = train_losses(workdir, seed_checkpoint, "upipe_compiled", 2, "llama3_debug_upipe.toml",
                            "--compile.enable", "--context_parallel.no-time-attention")
    assert_parity(compiled, reference_losses)


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
    reference = train_losses(workdir, seed_checkpoint, "none_509", 1, "llama3_debug_none.toml", *odd)
    pad = ("--context_parallel.pad_seq_len",)
    for name, nproc, config, extra in [
        ("upipe_pad", 2, "llama3_debug_upipe.toml", ()),
        ("usp_pad", 2, "llama3_debug_upipe_memory.toml",
         ("--context_parallel.style=usp", "--context_parallel.ulysses_degree=1")),
        ("upipe_c4_pad", 4, "llama3_debug_upipe.toml", ("--parallelism.context_parallel_degree=4",)),
    ]:
        assert_parity(train_losses(workdir, seed_checkpoint, name, nproc, config, *odd, *pad, *extra),
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
