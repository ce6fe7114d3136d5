"""Zigzag sequence layout for causal ring attention (load balancing).

With a contiguous split, ring rank ``R-1`` attends to the whole sequence and rank 0 only to
its own block.  The zigzag layout cuts the ring's sequence into ``2R`` equal chunks and gives
ring rank ``r`` chunks ``r`` and ``2R-1-r``, concatenated in that order, so every rank holds
one early and one late chunk and does the same causal work::

    R = 4, sequence cut into 2R = 8 chunks of S / 8 tokens

    chunk:   | 0 | 1 | 2 | 3 | 4 | 5 | 6 | 7 |
    rank:    | 0 | 1 | 2 | 3 | 3 | 2 | 1 | 0 |

    rank 0 holds [c0 | c7]      rank 1 holds [c1 | c6]
    rank 2 holds [c2 | c5]      rank 3 holds [c3 | c4]

The local order (first chunk ``r``, then chunk ``2R-1-r``) is increasing in global position,
so a causal mask on the local block alone is the correct mask of the rank against itself.
``zigzag_unshard`` is the exact inverse of ``zigzag_shard`` over all ranks (used by tests).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _check(seq_len: int, degree: int, rank: int | None = None) -> int:
    """Validate and return the chunk length ``seq_len // (2 * degree)``."""
    if degree < 1:
        raise ValueError(f"zigzag degree must be >= 1, got {degree}")
    if rank is not None and not 0 <= rank < degree:
        raise ValueError(f"zigzag rank {rank} out of range for degree {degree}")
    if seq_len % (2 * degree) != 0:
        raise ValueError(
            f"zigzag layout needs seq_len % (2 * degree) == 0: seq_len={seq_len} is not "
            f"divisible by 2 * {degree} = {2 * degree}"
        )
    return seq_len // (2 * degree)


def zigzag_indices(
    seq_len: int, degree: int, rank: int, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """Global positions held by ring ``rank`` of ``degree``, in local order (LongTensor)."""
    c = _check(seq_len, degree, rank)
    first = torch.arange(rank * c, (rank + 1) * c, device=device)
    j = 2 * degree - 1 - rank
    second = torch.arange(j * c, (j + 1) * c, device=device)
    return torch.cat((first, second))


def zigzag_shard(t: torch.Tensor, degree: int, rank: int, dim: int = 1) -> torch.Tensor:
    """Rank ``rank``'s zigzag shard of ``t`` along ``dim``: chunks ``rank`` and ``2R-1-rank``."""
    c = _check(t.shape[dim], degree, rank)
    j = 2 * degree - 1 - rank
    return torch.cat((t.narrow(dim, rank * c, c), t.narrow(dim, j * c, c)), dim=dim)


def zigzag_unshard(parts: Sequence[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`zigzag_shard`: ``parts[r]`` is rank ``r``'s shard; returns the sequence."""
    degree = len(parts)
    if degree == 0:
        raise ValueError("zigzag_unshard needs at least one part")
    n = parts[0].shape[dim]
    if n % 2 != 0 or any(p.shape[dim] != n for p in parts):
        raise ValueError(
            f"zigzag parts must all have the same even length along dim {dim}, got "
            f"{[p.shape[dim] for p in parts]}"
        )
    c = n // 2
    chunks: list[torch.Tensor | None] = [None] * (2 * degree)
    for r, p in enumerate(parts):
        chunks[r] = p.narrow(dim, 0, c)
        chunks[2 * degree - 1 - r] = p.narrow(dim, c, c)
    return torch.cat(chunks, dim=dim)  # type: ignore[arg-type]
