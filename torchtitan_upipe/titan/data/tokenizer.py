"""Offline byte-level BPE tokenizer for TorchTitan's Llama3 ``debugmodel``.

What is generated
-----------------
``ensure_debug_tokenizer(path)`` writes two files into ``path``:

* ``tokenizer.json`` -- a byte-level BPE (GPT-2 style pre-tokenizer and decoder)
  trained with the ``tokenizers`` library on the procedural corpus of
  :mod:`torchtitan_upipe.titan.data.corpus`; exactly ``vocab_size`` (default 2048)
  tokens: ids 0 and 1 are ``<|begin_of_text|>`` / ``<|end_of_text|>``, then the
  256 byte symbols, then the learned merges.  Byte-level means every UTF-8 string
  round-trips even if it is far from the training corpus.
* ``tokenizer_config.json`` -- the HF-style config that
  ``torchtitan.components.tokenizer.HuggingFaceTokenizer`` reads to find the
  bos/eos tokens (``bos_token``, ``eos_token``, ``added_tokens_decoder``) and the
  default ``add_bos_token: true`` / ``add_eos_token: false``.

Point ``model.hf_assets_path`` at ``path`` and TorchTitan's own
``build_hf_tokenizer`` loads it.

Why
---
The debug model has a 2048-entry embedding, so the Llama3 tokenizer (128k ids)
cannot be used, and the machines have no HF hub access.  The tokenizer is
therefore rebuilt on demand (about half a second) instead of being downloaded
or committed to git.

Determinism and concurrency
---------------------------
Training runs in a child Python process with ``RAYON_NUM_THREADS=1`` and
``TOKENIZERS_PARALLELISM=false`` on a corpus in a fixed order, so the output does
not depend on the core count, and the calling process never starts the
``tokenizers`` thread pool (which would otherwise warn and disable itself when
TorchTitan's dataloader workers fork).  Two builds give byte-identical
``tokenizer.json`` files (checked by ``tests/titan/test_data.py``).  Files are written
into a private temporary directory inside ``path`` and moved into place with
``os.replace``; ``tokenizer.json`` is moved last and acts as the "complete"
marker, so concurrent callers (e.g. every rank of a ``torchrun`` job) never see
a half-written tokenizer -- at worst several of them train and atomically
replace the files with identical bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "DEBUG_VOCAB_SIZE",
    "ensure_debug_tokenizer",
    "train_debug_tokenizer",
]

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
DEBUG_VOCAB_SIZE = 2048
"""Embedding size of TorchTitan's Llama3 ``debugmodel``: the largest vocab we build."""

TOKENIZER_TRAIN_DOCS = 1000
"""Corpus documents used for training (~1.1 MB of text, ~3.4k reachable merges)."""

_MIN_VOCAB = 2 + 256  # the two special tokens + the byte alphabet


def _check_vocab_size(vocab_size: int) -> None:
    if not _MIN_VOCAB < vocab_size <= DEBUG_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be in ({_MIN_VOCAB}, {DEBUG_VOCAB_SIZE}] so that every id "
            f"fits the debug model's embedding; got {vocab_size}"
        )


def _tokenizer_config() -> dict:
    """The ``tokenizer_config.json`` that HuggingFaceTokenizer understands."""

    def added(content: str) -> dict:
        return {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }

    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {"0": added(BOS_TOKEN), "1": added(EOS_TOKEN)},
        "bos_token": BOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "model_max_length": 1_000_000_000,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def train_debug_tokenizer(
    out_dir: str,
    vocab_size: int = DEBUG_VOCAB_SIZE,
    n_docs: int = TOKENIZER_TRAIN_DOCS,
    seed: int = 0,
) -> None:
    """Train the BPE in *this* process and write both files into ``out_dir``.

    Not atomic and it starts the ``tokenizers`` thread pool; normally called in a
    child process by :func:`ensure_debug_tokenizer`.
    """
    _check_vocab_size(vocab_size)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    generate_documents = _corpus_module().generate_documents
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(generate_documents(n_docs, seed=seed), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(
            f"BPE training produced {tok.get_vocab_size()} tokens instead of {vocab_size}: "
            f"the corpus ({n_docs} docs) has too few distinct merges; raise n_docs"
        )
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tok.to_str(pretty=True))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(_tokenizer_config(), f, indent=2, sort_keys=True)
        f.write("\n")


def _validate(out_dir: str, vocab_size: int) -> None:
    """Check size, id range and special-token ids of a freshly trained tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    vocab = tok.get_vocab(with_added_tokens=True)
    if len(vocab) != vocab_size:
        raise RuntimeError(f"tokenizer has {len(vocab)} tokens, expected {vocab_size}")
    if max(vocab.values()) >= vocab_size:
        raise RuntimeError(
            f"token id {max(vocab.values())} outside the {vocab_size}-entry embedding"
        )
    if vocab.get(BOS_TOKEN) != 0 or vocab.get(EOS_TOKEN) != 1:
        raise RuntimeError("special tokens must have ids 0 (bos) and 1 (eos)")


def _corpus_module():
    """:mod:`.corpus`, also when this file runs as a plain script (child mode).

    The child is started as ``python .../tokenizer.py`` rather than ``-m`` so it
    imports neither torch nor TorchTitan through the package ``__init__`` files;
    it then loads the sibling ``corpus.py`` by path.
    """
    if __package__:
        from . import corpus

        return corpus
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location(
        "_upipe_debug_corpus", os.path.join(here, "corpus.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ensure_debug_tokenizer(
    path: str,
    vocab_size: int = DEBUG_VOCAB_SIZE,
    *,
    n_docs: int = TOKENIZER_TRAIN_DOCS,
    seed: int = 0,
) -> str:
    """Make sure ``path`` holds the debug tokenizer; return ``path``.

    If ``path/tokenizer.json`` exists nothing is done.  Otherwise a byte-level BPE
    with exactly ``vocab_size`` tokens (``<|begin_of_text|>`` = 0,
    ``<|end_of_text|>`` = 1) is trained in a single-threaded child process and
    ``tokenizer_config.json`` + ``tokenizer.json`` are moved atomically into
    ``path`` (created if needed).
    """
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return path
    _check_vocab_size(vocab_size)
    os.makedirs(path, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-tokenizer-", dir=path)
    try:
        env = dict(os.environ)
        env["RAYON_NUM_THREADS"] = "1"
        env["TOKENIZERS_PARALLELISM"] = "false"
        cmd = [
            sys.executable, os.path.abspath(__file__), "--train-into", tmp,
            "--vocab-size", str(vocab_size), "--n-docs", str(n_docs), "--seed", str(seed),
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"debug tokenizer training failed (rc={proc.returncode}):\n{proc.stderr}"
            )
        _validate(tmp, vocab_size)
        # tokenizer.json last: its presence means the directory is complete.
        for name in ("tokenizer_config.json", "tokenizer.json"):
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m torchtitan_upipe.titan.data.tokenizer",
        description="Build the offline debug tokenizer into PATH (no-op if present).",
    )
    parser.add_argument("path", nargs="?", help="output directory (model.hf_assets_path)")
    parser.add_argument("--vocab-size", type=int, default=DEBUG_VOCAB_SIZE)
    parser.add_argument("--n-docs", type=int, default=TOKENIZER_TRAIN_DOCS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-into", help=argparse.SUPPRESS)  # internal: child mode
    args = parser.parse_args(argv)
    if args.train_into:
        train_debug_tokenizer(args.train_into, args.vocab_size, args.n_docs, args.seed)
    elif args.path:
        path = ensure_debug_tokenizer(
            args.path, args.vocab_size, n_docs=args.n_docs, seed=args.seed
        )
        print(path)
    else:
        parser.error("PATH is required")


if __name__ == "__main__":
    _main()
