"""The model's output layer computing the chunked loss in place of the logits.

TorchTitan's trainer computes ``loss_fn(model(inputs), labels)``, i.e. it materializes the
``(B, S/C, vocab)`` logits (hundreds of GB at millions of tokens).  :class:`ChunkedLossOutput`
is TorchTitan's ``output`` ``nn.Linear`` (same ``output.weight``) whose forward returns the
sum-reduced cross entropy of its logits against labels the trainer hands it just before the
forward (:meth:`set_labels`), computed by :func:`~.chunked_loss.chunked_cross_entropy` over
sequence chunks.  It runs inside the FSDP unit that owns ``output.weight``, so the weight is
unsharded when it is used.  The train spec's loss function then passes that scalar through.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .chunked_loss import chunked_cross_entropy

DEFAULT_CHUNK_TOKENS = 1024


class ChunkedLossOutput(nn.Linear):
    num_chunks: int = 0
    _labels: torch.Tensor | None = None

    def set_labels(self, labels: torch.Tensor) -> None:
        self._labels = labels

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        labels, self._labels = self._labels, None
        if labels is None:
            raise RuntimeError(
                "memory.chunked_loss: the output layer got no labels for this forward; the "
                "trainer must call set_labels(labels) before each forward (UPipeTrainer does)"
            )
        tokens = h.shape[0] * h.shape[1]
        chunks = self.num_chunks or max(1, math.ceil(tokens / DEFAULT_CHUNK_TOKENS))
        return chunked_cross_entropy(h, self.weight, labels, chunks)


def apply_chunked_loss(output: nn.Linear, num_chunks: int = 0) -> ChunkedLossOutput:
    """Turn TorchTitan's ``output`` layer into a :class:`ChunkedLossOutput` in place."""
    if output.bias is not None:
        raise ValueError("memory.chunked_loss needs a bias-free output layer")
    output.__class__ = ChunkedLossOutput
    output.num_chunks = num_chunks
    return output
