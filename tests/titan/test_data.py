"""Tests for torchtitan_upipe.titan.data: offline corpus, debug tokenizer, datasets.

Everything is generated into pytest's tmp dirs; nothing touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from torchtitan_upipe.titan.data import (
    BOS_TOKEN,
    DATASET_NAME,
    EOS_TOKEN,
    VALIDATION_DATASET_NAME,
    SyntheticTokenDataset,
    build_synthetic_dataloader,
    ensure_debug_tokenizer,
    generate_documents,
    register_debug_dataset,
)

SEQ_LEN = 64

# sha256 of "\x00".join(generate_documents(16, seed=0)): pins the corpus so a
# change of output (another machine, Python version or an edit) is noticed.
# Update deliberately when the generator is changed on purpose.
CORPUS_SHA256_16_SEED0 = "b78667461b55bdcf9e475a3a66e20d909ca803261a01f044e6d49a927a894e4f"


# --------------------------------------------------------------------------- #
# corpus
# --------------------------------------------------------------------------- #

def test_corpus_deterministic_and_varied():
    a = generate_documents(50, seed=0)
    assert a == generate_documents(50, seed=0)
    assert a[:20] == generate_documents(20, seed=0)  # prefix-stable
    assert a != generate_documents(50, seed=1)
    assert len(set(a)) == 50
    lengths = [len(d) for d in a]
    assert min(lengths) >= 300 and max(lengths) <= 2500
    text = "\n".join(a)
    for marker in (" plus ", "Once upon a time", "Let us count", " = "):
        assert marker in text
    assert text.isascii()


def test_corpus_pinned_hash():
    digest = hashlib.sha256("\x00".join(generate_documents(16, seed=0)).encode()).hexdigest()
    assert digest == CORPUS_SHA256_16_SEED0


def test_corpus_independent_of_hash_seed():
    """Same text in a fresh interpreter with a different PYTHONHASHSEED."""
    code = (
        "import hashlib, importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('c', sys.argv[1])\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(hashlib.sha256('\\x00'.join(m.generate_documents(16)).encode()).hexdigest())\n"
    )
    import torchtitan_upipe.titan.data.corpus as corpus

    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code, corpus.__file__],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert out == hashlib.sha256("\x00".join(generate_documents(16)).encode()).hexdigest()


# --------------------------------------------------------------------------- #
# tokenizer
# --------------------------------------------------------------------------- #

@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "debug_tokenizer")
    start = time.perf_counter()
    assert ensure_debug_tokenizer(path) == path
    elapsed = time.perf_counter() - start
    print(f"\ndebug tokenizer build: {elapsed:.2f} s")
    assert elapsed < 30  # ~1 s normally; generous for loaded CI machines
    return path


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    return HuggingFaceTokenizer(tokenizer_dir)


def test_tokenizer_files(tokenizer_dir):
    assert sorted(os.listdir(tokenizer_dir)) == ["tokenizer.json", "tokenizer_config.json"]
    with open(os.path.join(tokenizer_dir, "tokenizer_config.json")) as f:
        config = json.load(f)
    assert config["bos_token"] == BOS_TOKEN and config["eos_token"] == EOS_TOKEN
    assert config["add_bos_token"] is True and config["add_eos_token"] is False


def test_tokenizer_loads_in_torchtitan(hf_tokenizer):
    tok = hf_tokenizer
    assert tok.get_vocab_size() == 2048
    assert tok.bos_id == tok.token_to_id(BOS_TOKEN) == 0
    assert tok.eos_id == tok.token_to_id(EOS_TOKEN) == 1
    assert max(tok.get_vocab().values()) < 2048

    sentence = "Seven plus five is twelve. Once upon a time, a fox named Zoë ran 1234 steps!"
    ids = tok.encode(sentence, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert all(0 <= i < 2048 for i in ids)
    assert tok.decode(ids) == sentence  # special tokens skipped by default
    assert tok.encode(sentence)[0] == tok.bos_id  # add_bos_token default
    # the corpus compresses well (merges were learned on it)
    doc = generate_documents(1, seed=7)[0]
    assert len(tok.encode(doc)) < len(doc) / 3


def test_tokenizer_build_is_deterministic_and_idempotent(tokenizer_dir, tmp_path):
    other = str(tmp_path / "again")
    ensure_debug_tokenizer(other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(tokenizer_dir, name), "rb") as f1, open(
            os.path.join(other, name), "rb"
        ) as f2:
            assert f1.read() == f2.read(), name
    # existing tokenizer: returned as is, not rebuilt
    tok_json = os.path.join(other, "tokenizer.json")
    mtime = os.stat(tok_json).st_mtime_ns
    assert ensure_debug_tokenizer(other) == other
    assert os.stat(tok_json).st_mtime_ns == mtime
    assert sorted(os.listdir(other)) == ["tokenizer.json", "tokenizer_config.json"]


def test_tokenizer_rejects_oversized_vocab(tmp_path):
    with pytest.raises(ValueError):
        ensure_debug_tokenizer(str(tmp_path / "big"), vocab_size=4096)


# --------------------------------------------------------------------------- #
# upipe_debug_text through TorchTitan's own dataloader
# --------------------------------------------------------------------------- #

def _job_config(dataset: str = DATASET_NAME, batch_size: int = 2):
    from torchtitan.config import JobConfig

    cfg = JobConfig()
    cfg.training.dataset = dataset
    cfg.training.dataset_path = "/does/not/exist"  # ignored by the loader
    cfg.training.seq_len = SEQ_LEN
    cfg.training.local_batch_size = batch_size
    return cfg


def test_dataset_registered_idempotently():
    from torchtitan.hf_datasets.text_datasets import DATASETS

    register_debug_dataset()
    register_debug_dataset()
    assert DATASET_NAME in DATASETS and VALIDATION_DATASET_NAME in DATASETS
    ds = DATASETS[DATASET_NAME].loader("ignored")
    assert ds.column_names == ["text"] and len(ds) >= 1000
    assert DATASETS[DATASET_NAME].sample_processor(ds[0]) == generate_documents(1)[0]


def test_build_text_dataloader(hf_tokenizer):
    from torchtitan.hf_datasets.text_datasets import build_text_dataloader

    loader = build_text_dataloader(
        dp_world_size=2, dp_rank=1, tokenizer=hf_tokenizer, job_config=_job_config()
    )
    batches = []
    for i, (inputs, labels) in enumerate(loader):
        batches.append((inputs["input"], labels))
        if i == 2:
            break
    for x, y in batches:
        assert x.shape == y.shape == (2, SEQ_LEN)
        assert x.dtype == y.dtype == torch.long
        assert int(x.max()) < 2048 and int(y.max()) < 2048
        assert torch.equal(x[:, 1:], y[:, :-1])  # labels are inputs shifted by one
    assert int(batches[0][0][0, 0]) == hf_tokenizer.bos_id  # first document starts with bos


def test_hf_text_dataset_resume(hf_tokenizer):
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataset

    def make():
        return HuggingFaceTextDataset(
            DATASET_NAME, None, hf_tokenizer, seq_len=SEQ_LEN, dp_rank=0, dp_world_size=1
        )

    ds = make()
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = ds.state_dict()
    expected = next(it)
    resumed = make()
    resumed.load_state_dict(state)
    got = next(iter(resumed))
    assert torch.equal(got[0]["input"], expected[0]["input"])
    assert torch.equal(got[1], expected[1])


# --------------------------------------------------------------------------- #
# synthetic tokens
# --------------------------------------------------------------------------- #

def _first_batches(loader, n):
    out = []
    for i, (inputs, labels) in enumerate(loader):
        out.append((inputs["input"].clone(), labels.clone()))
        if i + 1 == n:
            break
    return out


def test_synthetic_shapes_and_range():
    loader = build_synthetic_dataloader(1, 0, None, _job_config(batch_size=3), vocab_size=100)
    (x, y), = _first_batches(loader, 1)
    assert x.shape == y.shape == (3, SEQ_LEN) and x.dtype == torch.long
    assert int(x.min()) >= 0 and int(x.max()) < 100 and int(y.max()) < 100
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_synthetic_packed_documents_are_seeded_and_of_the_mean_length():
    from torchtitan_upipe.cp.documents import Documents
    from torchtitan_upipe.titan.data import SyntheticTokenDataset

    data = SyntheticTokenDataset(4096, vocab_size=100, seed=3, document_len=32, eos_id=5)
    again = SyntheticTokenDataset(4096, vocab_size=100, seed=3, document_len=32, eos_id=5)
    plain = SyntheticTokenDataset(4096, vocab_size=100, seed=3)
    x, y = data.sample(7)
    assert torch.equal(x["input"], again.sample(7)[0]["input"])
    docs = Documents.from_tokens(x["input"][None], 5)
    lengths = (docs.cu_seqlens[1:] - docs.cu_seqlens[:-1]).double()
    assert 25 < lengths[:-1].mean() < 40  # geometric, mean 32 (the last is cut by the row end)
    assert int((x["input"] == 5).sum()) == docs.count - 1  # EOS ends documents only
    assert int((plain.sample(7)[0]["input"] == 5).sum()) > 20  # where random tokens hold some
    assert int(x["input"].max()) < 100
    assert torch.equal(x["input"][1:], y[:-1])
    with pytest.raises(ValueError, match="eos_id < vocab_size"):
        SyntheticTokenDataset(16, vocab_size=4, document_len=8, eos_id=4)


def test_synthetic_vocab_from_tokenizer(hf_tokenizer):
    loader = build_synthetic_dataloader(1, 0, hf_tokenizer, _job_config())
    assert loader.dataset.vocab_size == hf_tokenizer.get_vocab_size() == 2048


def test_synthetic_same_dp_rank_identical_other_rank_different():
    cfg = _job_config()
    a = _first_batches(build_synthetic_dataloader(4, 1, None, cfg), 3)
    b = _first_batches(build_synthetic_dataloader(4, 1, None, cfg), 3)  # e.g. a CP peer
    c = _first_batches(build_synthetic_dataloader(4, 2, None, cfg), 3)
    for (xa, ya), (xb, yb), (xc, _) in zip(a, b, c):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert not torch.equal(xa, xc)
    assert not torch.equal(a[0][0], a[1][0])  # successive batches differ


def test_synthetic_resume_via_dataloader_state():
    cfg = _job_config()
    loader = build_synthetic_dataloader(2, 0, None, cfg)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    expected = next(it)

    fresh = build_synthetic_dataloader(2, 0, None, cfg)
    fresh.load_state_dict(state)
    got = next(iter(fresh))
    assert torch.equal(got[0]["input"], expected[0]["input"])
    assert torch.equal(got[1], expected[1])


def test_synthetic_dataset_state_and_finite():
    kwargs = dict(seq_len=8, vocab_size=50, dp_rank=3, seed=5, infinite=False, num_samples=4)
    ds = SyntheticTokenDataset(**kwargs)
    samples = list(ds)
    assert len(samples) == 4 and ds.state_dict() == {"sample_idx": 4}
    other = SyntheticTokenDataset(**kwargs)
    other.load_state_dict({"sample_idx": 2})
    rest = list(other)
    assert len(rest) == 2 and torch.equal(rest[0][1], samples[2][1])


def test_synthetic_long_sequence_is_cheap():
    seq_len = 1 << 20
    ds = SyntheticTokenDataset(seq_len=seq_len, vocab_size=2048)
    inputs, labels = next(iter(ds))
    assert inputs["input"].shape == labels.shape == (seq_len,)
    # input and label are views of one (seq_len + 1) buffer: O(seq_len) memory
    assert inputs["input"].untyped_storage().data_ptr() == labels.untyped_storage().data_ptr()
    assert inputs["input"].untyped_storage().nbytes() == (seq_len + 1) * 8
