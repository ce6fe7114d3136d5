"""Packed documents in the real trainer (torchrun, CPU, gloo, fp32, one seed checkpoint).

TorchTitan's ``debugmodel_flex_attn`` flavor (``attn_mask_type = "block_causal"``) under
ulysses and upipe, at 2 and 4 ranks, with the memory stack, on the debug text (documents end
with the tokenizer's EOS) and on synthetic packed documents: the per-step losses agree to
1e-5 relative (fp32 reduction order), and differ from plain causal attention on the same data
(the mask is applied).  On one CPU rank there is no plain-TorchTitan reference: its flex
attention has no CPU backward (the logits are compared with it in tests/titan/test_documents.py).
"""

import pytest

from tests.helpers.trainer import check, run_train, tensorboard_losses

pytestmark = pytest.mark.slow

STEPS = 4
FLEX = "--model.flavor=debugmodel_flex_attn"
COMMON = (f"--training.steps={STEPS}", "--training.seq_len=512", "--training.local_batch_size=2",
          "--training.mixed_precision_param=float32", "--debug.seed=0")
SYNTHETIC = ("--training.dataset=synthetic", "--benchmark.synthetic_document_len=24")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("documents")


@pytest.fixture(scope="module")
def seed_checkpoint(workdir):
    from torchtitan_upipe.titan.data import ensure_debug_tokenizer

    ensure_debug_tokenizer(str(workdir / "outputs" / "assets" / "upipe_debug_tokenizer"))
    dump = workdir / "seed"
    check(run_train(1, "llama3_debug_none.toml", f"--job.dump_folder={dump}", "--checkpoint.enable",
                    "--checkpoint.create_seed_checkpoint", "--model.name=llama3", *COMMON,
                    cwd=workdir))
    return str(dump / "checkpoint" / "step-0")


def _losses(workdir, seed_checkpoint, name, nproc, config, *extra):
    dump = workdir / name
    proc = run_train(nproc, config, f"--job.dump_folder={dump}", "--checkpoint.enable",
                     f"--checkpoint.initial_load_path={seed_checkpoint}",
                     "--checkpoint.interval=1000", *COMMON, *extra, cwd=workdir)
    check(proc)
    losses = tensorboard_losses(str(dump))
    assert sorted(losses) == list(range(1, STEPS + 1)), losses
    return [losses[s] for s in range(1, STEPS + 1)], proc.stdout + proc.stderr


def _max_relative(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def ulysses_documents(workdir, seed_checkpoint):
    return _losses(workdir, seed_checkpoint, "ulysses2", 2, "llama3_debug_ulysses.toml", FLEX)


def test_styles_and_degrees_agree_on_packed_documents(workdir, seed_checkpoint, ulysses_documents):
    reference, log = ulysses_documents
    assert "block_causal: the first batch holds 4 documents" in log
    runs = {
        "upipe2": (2, "llama3_debug_upipe.toml"),
        "upipe2_memory": (2, "llama3_debug_upipe_memory.toml"),
        "upipe4_u8": (4, "llama3_debug_upipe.toml", "--parallelism.context_parallel_degree=4",
                      "--context_parallel.upipe_chunk_heads=8"),
        "ulysses4": (4, "llama3_debug_ulysses.toml", "--parallelism.context_parallel_degree=4"),
        "upipe2_compiled": (2, "llama3_debug_upipe.toml", "--compile.enable",
                            "--context_parallel.no-time-attention"),
    }
    for name, (nproc, config, *extra) in runs.items():
        losses, _ = _losses(workdir, seed_checkpoint, name, nproc, config, FLEX, *extra)
        worst = _max_relative(losses, reference)
        print(f"{name}: {losses} vs ulysses2 {reference}: max relative difference {worst:.2e}")
        assert worst <= 1e-5, (name, losses, reference)


def test_the_document_mask_changes_the_losses(workdir, seed_checkpoint, ulysses_documents):
    causal, _ = _losses(workdir, seed_checkpoint, "ulysses2_causal", 2, "llama3_debug_ulysses.toml")
    worst = _max_relative(ulysses_documents[0], causal)
    print(f"block_causal {ulysses_documents[0]} vs causal {causal}: {worst:.2e}")
    assert worst > 1e-4


def test_synthetic_packed_documents(workdir, seed_checkpoint):
    ulysses, log = _losses(workdir, seed_checkpoint, "ulysses2_synthetic", 2,
                           "llama3_debug_ulysses.toml", FLEX, *SYNTHETIC)
    count = int(log.split("block_causal: the first batch holds ")[1].split()[0])
    assert 20 <= count <= 80, count  # 1024 tokens in documents of 24 on average: about 43
    upipe, _ = _losses(workdir, seed_checkpoint, "upipe2_synthetic", 2, "llama3_debug_upipe.toml",
                       FLEX, *SYNTHETIC)
    assert _max_relative(upipe, ulysses) <= 1e-5, (upipe, ulysses)
