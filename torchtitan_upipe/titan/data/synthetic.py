"""Synthetic random-token dataloader for throughput / memory benchmarks.

What is generated
-----------------
An endless (or ``num_samples`` long) stream of ``({"input": x[:-1]}, x[1:])``
pairs, ``x`` being ``seq_len + 1`` uniform random token ids in
``[0, vocab_size)``.  Sample ``i`` of data-parallel rank ``r`` is drawn from a
``torch.Generator`` seeded with a hash of ``(seed, r, i)``.  With ``document_len > 0`` a
sample packs documents of random lengths (geometric, mean ``document_len``, drawn from the
same generator), each ended by an ``eos_id`` token, and the random tokens avoid ``eos_id``:
the data ``block_causal`` flavors mask.

Why
---
Benchmarks of long-context parallelism (sequence lengths up to millions of
tokens) must not be bottlenecked or perturbed by tokenization and need no data
on disk.  Properties that matter:

* **rank-consistent**: every process with the same ``dp_rank`` -- e.g. all
  context-parallel / tensor-parallel peers of one data-parallel replica -- sees
  byte-identical samples, while different ``dp_rank`` s see different ones;
* **O(seq_len) memory** per sample: one ``seq_len + 1`` int64 tensor, input and
  label being views of it (no corpus, no token buffer);
* **resumable**: the dataset is ``Stateful`` (``{"sample_idx": i}``), so
  TorchTitan's checkpointing through ``ParallelAwareDataloader`` resumes at the
  next sample;
* **deterministic** regardless of how many samples were drawn before (random
  access by index).

The loss on this data cannot drop below ``ln(vocab_size)``; use
``upipe_debug_text`` when learning must be visible.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from typing import Any, Iterator

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.config import JobConfig

__all__ = ["SyntheticTokenDataset", "build_synthetic_dataloader"]

DEFAULT_VOCAB_SIZE = 2048


def _sample_seed(seed: int, dp_rank: int, index: int) -> int:
    """63-bit generator seed derived from ``(seed, dp_rank, index)`` (platform independent)."""
    digest = hashlib.blake2b(f"upipe-synthetic/{seed}/{dp_rank}/{index}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)


class SyntheticTokenDataset(IterableDataset, Stateful):
    """Random ``seq_len`` input/label pairs, identical for identical ``(seed, dp_rank)``."""

    def __init__(
        self,
        seq_len: int,
        vocab_size: int = DEFAULT_VOCAB_SIZE,
        dp_rank: int = 0,
        seed: int = 0,
        infinite: bool = True,
        num_samples: int | None = None,
        document_len: int = 0,
        eos_id: int = 0,
    ) -> None:
        if seq_len < 1 or vocab_size < 1:
            raise ValueError(f"need seq_len >= 1 and vocab_size >= 1, got {seq_len}, {vocab_size}")
        if document_len < 0 or not 0 <= eos_id < vocab_size or (document_len and vocab_size < 2):
            raise ValueError(f"need document_len >= 0 and 0 <= eos_id < vocab_size, got "
                             f"{document_len}, {eos_id}")
        if not infinite and num_samples is None:
            raise ValueError("a finite synthetic dataset needs num_samples")
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.dp_rank = dp_rank
        self.seed = seed
        self.infinite = infinite
        self.num_samples = num_samples
        self.document_len, self.eos_id = document_len, eos_id
        self._sample_idx = 0

    def sample(self, index: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Sample ``index`` of this rank's stream (random access, no state change)."""
        gen = torch.Generator(device="cpu")
        gen.manual_seed(_sample_seed(self.seed, self.dp_rank, index))
        ids = self.vocab_size - (1 if self.document_len else 0)  # packed: every id but the EOS
        x = torch.randint(0, ids, (self.seq_len + 1,), generator=gen, dtype=torch.long)
        if self.document_len:
            x += (x >= self.eos_id).long()
            n = self.seq_len + 1  # at most this many documents
            lengths = torch.empty(n, dtype=torch.float64).geometric_(1 / self.document_len,
                                                                       generator=gen)
            ends = torch.cumsum(lengths.long(), 0) - 1  # each document's last token: its EOS
            x[ends[ends < n]] = self.eos_id
        return {"input": x[:-1]}, x[1:]

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        while self.infinite or self._sample_idx < self.num_samples:
            index = self._sample_idx
            # Advance before yielding: a state_dict taken while the consumer holds
            # this sample must resume at the *next* one.
            self._sample_idx += 1
            yield self.sample(index)

    def state_dict(self) -> dict[str, Any]:
        return {"sample_idx": self._sample_idx}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._sample_idx = int(state_dict["sample_idx"])


def build_synthetic_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: BaseTokenizer | None,
    job_config: JobConfig,
    infinite: bool = True,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int | None = None,
    num_samples: int | None = None,
    eos_id: int = 0,
) -> ParallelAwareDataloader:
    """Drop-in replacement for TorchTitan's ``build_text_dataloader`` (same positional API).

    ``vocab_size`` is ``tokenizer.get_vocab_size()`` when a tokenizer is given,
    else the keyword (default 2048, the Llama3 debugmodel embedding).  ``seed``
    defaults to ``job_config.debug.seed`` (or 0).  With ``infinite=False`` the
    stream stops after ``num_samples`` samples (default
    ``local_batch_size * training.steps``).  Batch size, ``seq_len`` and the
    ``[training.dataloader]`` options come from ``job_config.training``; packed documents
    (``benchmark.synthetic_document_len``) end with ``eos_id``.
    """
    training = job_config.training
    if tokenizer is not None:
        vocab_size = tokenizer.get_vocab_size()
    if seed is None:
        seed = job_config.debug.seed if job_config.debug.seed is not None else 0
    if not infinite and num_samples is None:
        num_samples = training.local_batch_size * max(training.steps, 1)

    dataset = SyntheticTokenDataset(
        seq_len=training.seq_len,
        vocab_size=vocab_size,
        dp_rank=dp_rank,
        seed=seed,
        infinite=infinite,
        num_samples=num_samples,
        document_len=getattr(getattr(job_config, "benchmark", None), "synthetic_document_len", 0),
        eos_id=eos_id,
    )
    dataloader_kwargs = {**asdict(training.dataloader), "batch_size": training.local_batch_size}
    return ParallelAwareDataloader(
        dataset, dp_rank=dp_rank, dp_world_size=dp_world_size, **dataloader_kwargs
    )
