"""Which heads each UPipe stage computes on which rank: the GQA-aware stage schedule.

Notation: ``C`` ranks, ``H`` query heads, ``H_kv`` KV heads, ``U`` query heads per stage
across all ranks (``U % C == 0``, ``H % U == 0``), ``m = U / C`` query heads per rank per stage.

KV heads are first made divisible by ``C``: ``rho = 1`` if ``H_kv % C == 0``, else each KV head
is replicated ``rho = C / H_kv`` times (requires ``C % H_kv == 0``), giving ``H_kv' = H_kv*rho``
*virtual* KV heads; virtual head ``v`` is real head ``v // rho``.  ``g = H / H_kv'`` query heads
share a virtual KV head (canonical GQA: query head ``h`` uses virtual KV head ``h // g``).

Per rank, a stage pairs ``m`` query heads with ``kappa`` KV heads, ``gamma = gcd(m, g)`` query
heads per KV head (``m = kappa * gamma``).  A **KV chunk** is ``C * kappa`` virtual KV heads
(``kappa`` per rank), projected and all-to-all'd **once** and reused by the ``tau = g / gamma``
consecutive stages that cover all ``g`` query heads of each of them.  Stage ``s`` is step
``t = s % tau`` of chunk ``c = s // tau``; on rank ``r``::

    kv_head(c, r, j)       = c*C*kappa + r*kappa + j                      j < kappa
    query_head(s, r, j, i) = kv_head(c, r, j) * g + t*gamma + i           i < gamma

so ``query_head // g == kv_head`` (correct GQA pairing), every query head is computed exactly
once, and each rank's local query heads ``j*gamma + i`` use local KV head ``j`` (the kernel's
own GQA ratio is ``gamma``).  Example, H=16, H_kv=4, C=4, U=4 (the paper's figure)::

    stage 0: ranks 0..3 compute q 0, 4, 8, 12   with kv 0..3   (K/V sent here, once)
    stage 1:                    q 1, 5, 9, 13   with kv 0..3   (only Q sent)
    stage 2:                    q 2, 6, 10, 14
    stage 3:                    q 3, 7, 11, 15

A chunk's virtual KV heads are a contiguous range, and a stage's query heads are the
strided block ``wq.view(H_kv', g, D, dim)[chunk range, t*gamma:(t+1)*gamma]``: weights stay in
canonical order and outputs are written back to canonical head positions, so no
re-parameterization or output permutation exists anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..gqa import kv_replication


@dataclass(frozen=True)
class UPipeSchedule:
    """The schedule of ``n_heads`` query heads and ``n_kv_heads`` KV heads in stages of
    ``chunk_heads`` (U) over ``degree`` (C) ranks.  The derived sizes are computed once, when
    the schedule is built (see the module docstring for the symbols)."""

    n_heads: int
    n_kv_heads: int
    degree: int
    chunk_heads: int
    rho: int = field(init=False, compare=False)
    """Replication factor of each real KV head."""
    virtual_kv_heads: int = field(init=False, compare=False)
    """H_kv' = H_kv rho."""
    group_size: int = field(init=False, compare=False)
    """g: query heads per virtual KV head."""
    heads_per_rank: int = field(init=False, compare=False)
    """m = U / C: query heads per rank per stage."""
    gamma: int = field(init=False, compare=False)
    """gcd(m, g): a stage's query heads per KV head."""
    kappa: int = field(init=False, compare=False)
    """KV heads per rank per chunk."""
    stages_per_chunk: int = field(init=False, compare=False)
    """tau: consecutive stages that reuse one KV chunk."""
    n_stages: int = field(init=False, compare=False)
    n_chunks: int = field(init=False, compare=False)
    chunk_kv_heads: int = field(init=False, compare=False)
    """Virtual KV heads per chunk across all ranks (C * kappa)."""

    def __post_init__(self) -> None:
        c, u, h = self.degree, self.chunk_heads, self.n_heads
        if u <= 0 or u % c != 0:
            raise ValueError(
                f"context_parallel.upipe_chunk_heads={u} must be a positive multiple of the "
                f"all-to-all degree {c} (each rank takes U/C heads per stage); "
                f"valid: {valid_chunk_heads(h, c)}"
            )
        if h % u != 0:
            raise ValueError(
                f"context_parallel.upipe_chunk_heads={u} must divide n_heads={h}; "
                f"valid: {valid_chunk_heads(h, c)}"
            )
        rho = kv_replication(h, self.n_kv_heads, c)  # raises for incompatible KV heads
        g = h // (self.n_kv_heads * rho)
        m = u // c
        gamma = math.gcd(m, g)
        sizes = {"rho": rho, "virtual_kv_heads": self.n_kv_heads * rho, "group_size": g,
                 "heads_per_rank": m, "gamma": gamma, "kappa": m // gamma,
                 "stages_per_chunk": g // gamma, "n_stages": h // u,
                 "n_chunks": h // u // (g // gamma), "chunk_kv_heads": c * (m // gamma)}
        for name, value in sizes.items():
            object.__setattr__(self, name, value)
        # with replicated KV heads each rank holds one virtual KV head: a single chunk
        assert self.rho == 1 or self.n_chunks == 1

    @classmethod
    def resolve(cls, n_heads: int, n_kv_heads: int, degree: int,
                chunk_heads: int | None = 0) -> UPipeSchedule:
        """The schedule for ``chunk_heads`` as :func:`resolve_chunk_heads` reads it."""
        return cls(n_heads, n_kv_heads, degree, resolve_chunk_heads(chunk_heads, degree))

    # ---- head maps -----------------------------------------------------------------------
    def kv_range(self, chunk: int) -> range:
        """Virtual KV heads of ``chunk``, in all-to-all order (rank-major)."""
        start = chunk * self.chunk_kv_heads
        return range(start, start + self.chunk_kv_heads)

    def query_slot(self, stage: int) -> slice:
        """Slice of the ``g`` axis of ``wq.view(H_kv', g, D, dim)`` that ``stage`` covers."""
        t = stage % self.stages_per_chunk
        return slice(t * self.gamma, (t + 1) * self.gamma)

    def kv_head(self, chunk: int, rank: int, j: int) -> int:
        return chunk * self.chunk_kv_heads + rank * self.kappa + j

    def query_head(self, stage: int, rank: int, j: int, i: int) -> int:
        chunk, t = divmod(stage, self.stages_per_chunk)
        return self.kv_head(chunk, rank, j) * self.group_size + t * self.gamma + i

    def stage_query_heads(self, stage: int) -> list[list[int]]:
        """Per rank, the canonical query heads ``stage`` computes, in local order."""
        return [
            [self.query_head(stage, r, j, i) for j in range(self.kappa) for i in range(self.gamma)]
            for r in range(self.degree)
        ]

    def chunk_kv_heads_per_rank(self, chunk: int) -> list[list[int]]:
        """Per rank, the real KV heads of ``chunk``, in local order."""
        return [
            [self.kv_head(chunk, r, j) // self.rho for j in range(self.kappa)]
            for r in range(self.degree)
        ]


def resolve_chunk_heads(chunk_heads: int | None, degree: int) -> int:
    """U for a requested ``chunk_heads``: ``0``/``None`` means ``degree``, one query head per
    rank per stage, the least memory (``[context_parallel] upipe_chunk_heads = 0``)."""
    return chunk_heads or degree


def valid_chunk_heads(n_heads: int, degree: int) -> list[int]:
    """All valid U for ``n_heads`` and degree ``C``: multiples of C that divide n_heads."""
    return [u for u in range(degree, n_heads + 1, degree) if n_heads % u == 0]
