"""The ``upipe_debug_text`` dataset for TorchTitan's own text dataloader.

What is generated
-----------------
An in-memory ``datasets.Dataset`` with a single ``"text"`` column holding
:func:`torchtitan_upipe.titan.data.corpus.generate_documents` output (4096 documents,
~4.7 MB, built in well under a second).  A second entry,
``upipe_debug_text_validation``, uses a different seed, i.e. held-out text from
the same distribution.

Why
---
TorchTitan selects training text by name from
``torchtitan.hf_datasets.text_datasets.DATASETS``; its defaults (``c4``,
``c4_test``) need the HF hub or test assets that the pip wheel does not ship.
Registering this entry makes ``training.dataset = "upipe_debug_text"`` work with
the stock ``build_text_dataloader`` / ``HuggingFaceTextDataset`` (tokenization,
packing into ``seq_len + 1`` windows, dp sharding and checkpointable state are
all TorchTitan's) fully offline, with nothing on disk.  The loader ignores
``training.dataset_path``.

Registration happens when this module is imported (``import
torchtitan_upipe.titan.data``); :func:`register_debug_dataset` does the same
explicitly and is idempotent.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from datasets import Dataset
from torchtitan.hf_datasets import DatasetConfig
from torchtitan.hf_datasets import text_datasets

from .corpus import generate_documents

__all__ = [
    "DATASET_NAME",
    "VALIDATION_DATASET_NAME",
    "load_debug_text_dataset",
    "register_debug_dataset",
]

DATASET_NAME = "upipe_debug_text"
VALIDATION_DATASET_NAME = "upipe_debug_text_validation"
DEFAULT_NUM_DOCS = 4096
TRAIN_SEED = 0
VALIDATION_SEED = 1
VALIDATION_NUM_DOCS = 512


def load_debug_text_dataset(
    path: str | None = None, *, n_docs: int = DEFAULT_NUM_DOCS, seed: int = TRAIN_SEED
) -> Dataset:
    """In-memory ``Dataset({"text": [...]})`` of procedural documents; ``path`` is ignored."""
    del path  # nothing is read from disk
    return Dataset.from_dict({"text": generate_documents(n_docs, seed=seed)})


def _text(sample: dict[str, Any]) -> str:
    return sample["text"]


def register_debug_dataset(
    n_docs: int = DEFAULT_NUM_DOCS,
    seed: int = TRAIN_SEED,
    validation_n_docs: int = VALIDATION_NUM_DOCS,
    validation_seed: int = VALIDATION_SEED,
) -> None:
    """Add ``upipe_debug_text`` (and ``..._validation``) to TorchTitan's ``DATASETS``.

    Idempotent: calling it again (with the same arguments) leaves the same entries.
    """
    text_datasets.DATASETS[DATASET_NAME] = DatasetConfig(
        path=f"<procedural:{DATASET_NAME}>",
        loader=partial(load_debug_text_dataset, n_docs=n_docs, seed=seed),
        sample_processor=_text,
    )
    text_datasets.DATASETS[VALIDATION_DATASET_NAME] = DatasetConfig(
        path=f"<procedural:{VALIDATION_DATASET_NAME}>",
        loader=partial(load_debug_text_dataset, n_docs=validation_n_docs, seed=validation_seed),
        sample_processor=_text,
    )


register_debug_dataset()
