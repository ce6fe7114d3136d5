"""Offline data for TorchTitan runs: nothing downloaded, nothing committed.

* :mod:`.corpus` -- deterministic procedural English-like documents.
* :mod:`.tokenizer` -- builds a 2048-token byte-level BPE for the Llama3
  ``debugmodel`` from that corpus on demand (``ensure_debug_tokenizer``).
* :mod:`.text_dataset` -- registers ``upipe_debug_text`` (and
  ``upipe_debug_text_validation``) in TorchTitan's ``DATASETS`` so
  ``training.dataset = "upipe_debug_text"`` works with ``build_text_dataloader``.
  Importing this package performs the registration.
* :mod:`.synthetic` -- random-token dataloader for benchmarks
  (``build_synthetic_dataloader``, same signature as ``build_text_dataloader``).
"""

from .corpus import generate_document, generate_documents
from .synthetic import SyntheticTokenDataset, build_synthetic_dataloader
from .text_dataset import (
    DATASET_NAME,
    VALIDATION_DATASET_NAME,
    load_debug_text_dataset,
    register_debug_dataset,
)
from .tokenizer import BOS_TOKEN, DEBUG_VOCAB_SIZE, EOS_TOKEN, ensure_debug_tokenizer

__all__ = [
    "BOS_TOKEN",
    "DATASET_NAME",
    "DEBUG_VOCAB_SIZE",
    "EOS_TOKEN",
    "SyntheticTokenDataset",
    "VALIDATION_DATASET_NAME",
    "build_synthetic_dataloader",
    "ensure_debug_tokenizer",
    "generate_document",
    "generate_documents",
    "load_debug_text_dataset",
    "register_debug_dataset",
]
