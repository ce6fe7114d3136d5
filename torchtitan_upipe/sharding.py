"""How a batch's sequence is split over the context-parallel ranks (inputs, labels, RoPE).

Sharding contract.  A :class:`SequenceSharder` for ``degree`` ranks maps the global sequence
``[0, S)`` to the tokens rank ``rank`` holds, in local order (:meth:`indices`).  Inputs, labels
and RoPE positions are all sharded with the same indices, so token ``i`` of a rank's shard
has label ``labels[indices[i]]`` and position ``indices[i]``.  A length that does not divide
evenly is an error, never a silent truncation.

Ulysses-family styles use :class:`ContiguousSharder`: the all-to-all gathers the whole sequence
for a subset of heads, so every rank runs one full causal attention and needs no load
balancer::

    S = 8, C = 2:   rank 0 -> tokens 0 1 2 3     rank 1 -> tokens 4 5 6 7
"""

from __future__ import annotations

import abc

import torch


class SequenceSharder(abc.ABC):
    def __init__(self, degree: int, rank: int) -> None:
        if not 0 <= rank < degree:
            raise ValueError(f"rank {rank} is outside a context-parallel group of {degree}")
        self.degree, self.rank = degree, rank

    @abc.abstractmethod
    def indices(self, seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Global positions held by this rank, in local order: ``(seq_len / degree,)``."""

    def check_length(self, seq_len: int, multiple: int | None = None) -> None:
        multiple = multiple or self.degree
        if seq_len % multiple != 0:
            raise ValueError(
                f"sequence length {seq_len} is not divisible by {multiple} "
                f"(context-parallel degree {self.degree}); set training.seq_len to a multiple of {multiple}"
            )

    def shard(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's part of ``t`` along ``dim`` (the sequence dimension)."""
        return t.index_select(dim, self.indices(t.shape[dim], t.device))

    def positions(self, batch: int, seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """RoPE positions of this rank's tokens, ``(batch, seq_len / degree)`` int64."""
        return self.indices(seq_len, device).unsqueeze(0).expand(batch, -1)


class ContiguousSharder(SequenceSharder):
    """Rank ``r`` holds tokens ``[r*S/C, (r+1)*S/C)``."""

    def indices(self, seq_len, device="cpu"):
        self.check_length(seq_len)
        s = seq_len // self.degree
        return torch.arange(self.rank * s, (self.rank + 1) * s, device=device)

    def shard(self, t, dim=1):
        self.check_length(t.shape[dim])
        s = t.shape[dim] // self.degree
        return t.narrow(dim, self.rank * s, s)
