"""How a batch's sequence is split over the context-parallel ranks (inputs, labels, RoPE).

Sharding contract.  A :class:`SequenceSharder` for ``degree`` ranks maps the global sequence
``[0, S)`` to the tokens rank ``rank`` holds, in local order (:meth:`indices`).  Inputs, labels
and RoPE positions are all sharded with the same indices, so token ``i`` of a rank's shard
has label ``labels[indices[i]]`` and position ``indices[i]``.  A length that does not divide
evenly is an error, never a silent truncation.

Pure Ulysses/UPipe uses :class:`ContiguousSharder`: the all-to-all gathers the whole
sequence for a subset of heads, so every rank runs one full causal attention and needs no
load balancer::

    S = 8, C = 2:   rank 0 -> tokens 0 1 2 3     rank 1 -> tokens 4 5 6 7

The Ulysses x ring hybrids use :class:`UlyssesRingSharder`, composed so that *after* the
all-to-all each rank holds exactly the zigzag layout the ring kernel assumes.
"""

from __future__ import annotations

import abc

import torch

from ..cp.zigzag import zigzag_indices


def padded_length(seq_len: int, cp: int, ring: int) -> int:
    """The shortest length ``>= seq_len`` that ``cp`` ranks can split: a multiple of ``cp``,
    or of ``2 cp`` when there is a ring dimension (``ring > 1``: zigzag halves)."""
    quantum = 2 * cp if ring > 1 else cp
    return -(-seq_len // quantum) * quantum


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


class UlyssesRingSharder(SequenceSharder):
    """Zigzag over the ring, contiguous inside each all-to-all group.

    ``R`` ring ranks x ``u`` Ulysses ranks (CP rank ``= ring_rank * u + ulysses_rank``, see
    :mod:`.groups`).  The sequence is cut into ``2R`` chunks; ring rank ``p``
    owns chunks ``p`` and ``2R-1-p`` (zigzag: every ring rank gets equal causal work), and
    Ulysses rank ``j`` of that ring rank holds the ``j``-th contiguous ``1/u`` of the
    concatenation ``[chunk p | chunk 2R-1-p]``.  The all-to-all gathers the ``u`` pieces in
    Ulysses-rank order, which re-forms ``[chunk p | chunk 2R-1-p]`` exactly -- the layout of
    :func:`torchtitan_upipe.cp.ring.ring_attention`::

        S = 16, R = 2, u = 2, chunks of 4 tokens c0..c3
        ring rank 0 owns [c0 | c3]:  cp rank 0 (j=0) -> 0..3      cp rank 1 (j=1) -> 12..15
        ring rank 1 owns [c1 | c2]:  cp rank 2 (j=0) -> 4..7      cp rank 3 (j=1) -> 8..11
        after the all-to-all, ring rank 0's heads see 0..3,12..15 = [c0 | c3]   (correct)

    Sharding the whole CP group round-robin instead (2C chunks, CP rank ``r`` taking ``r`` and
    ``2C-1-r``, as the paper's code does) gathers ``[0,1,14,15,2,3,12,13]`` for ring rank 0:
    not ``[c0 | c3]``, so the ring kernel's causal masks would be wrong.

    Requires ``S % (2 * R * u) == 0``.
    """

    def __init__(self, ulysses_degree: int, ring_degree: int, ulysses_rank: int, ring_rank: int) -> None:
        super().__init__(ulysses_degree * ring_degree, ring_rank * ulysses_degree + ulysses_rank)
        self.u, self.r = ulysses_degree, ring_degree
        self.ulysses_rank, self.ring_rank = ulysses_rank, ring_rank

    def indices(self, seq_len, device="cpu"):
        self.check_length(seq_len, 2 * self.degree)
        piece = seq_len // self.degree
        ring_part = zigzag_indices(seq_len, self.r, self.ring_rank, device=device)
        return ring_part[self.ulysses_rank * piece : (self.ulysses_rank + 1) * piece]


def sharder_for(groups) -> SequenceSharder:
    """The sharder matching :class:`~.groups.CPGroups`."""
    if groups.ring_degree == 1:
        return ContiguousSharder(groups.ulysses_degree, groups.ulysses_rank)
    return UlyssesRingSharder(groups.ulysses_degree, groups.ring_degree, groups.ulysses_rank, groups.ring_rank)
