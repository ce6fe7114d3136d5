"""Grouped-query attention: which KV heads a rank needs, and the one replicate/reduce pair.

Canonical GQA: query head ``h`` uses KV head ``h // g``, ``g = H / H_kv``.

An all-to-all over ``C`` ranks gives each rank ``H / C`` query heads, so ``H % C == 0``.
Rank ``r`` then holds query heads ``[r*H/C, (r+1)*H/C)``, whose key/value heads are:

* ``H_kv % C == 0``: KV heads ``[r*H_kv/C, (r+1)*H_kv/C)`` -- K/V travel with their own
  ``H_kv`` heads, no duplication.
* ``C % H_kv == 0``: the single KV head ``r // (C/H_kv)``.  Each KV head is replicated
  ``rho = C/H_kv`` times (in the computation, never by mutating parameters) so that every
  rank receives one; the gradients of the replicas are summed by :func:`sum_kv_heads`.
* otherwise no rank layout exists: an error.

:func:`repeat_kv_heads` and :func:`sum_kv_heads` are that replication and its gradient.  The
same pair expands K/V to every query head for kernels that need equal head counts (math,
cuDNN) and sums the expanded gradients back.
"""

from __future__ import annotations

import torch


def kv_replication(n_heads: int, n_kv_heads: int, degree: int) -> int:
    """Return how many times each KV head is replicated for an all-to-all over ``degree`` ranks.

    Raises ``ValueError`` naming the offending sizes when no layout exists.
    """
    if n_heads <= 0 or n_kv_heads <= 0 or degree <= 0:
        raise ValueError(
            f"head counts and degree must be positive: n_heads={n_heads}, "
            f"n_kv_heads={n_kv_heads}, degree={degree}"
        )
    if n_heads % n_kv_heads != 0:
        raise ValueError(
            f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}"
        )
    if n_heads % degree != 0:
        raise ValueError(
            f"n_heads={n_heads} is not divisible by the all-to-all degree {degree}: "
            f"every rank must hold the same number of query heads"
        )
    if n_kv_heads % degree == 0:
        return 1
    if degree % n_kv_heads == 0:
        return degree // n_kv_heads
    raise ValueError(
        f"n_kv_heads={n_kv_heads} and the all-to-all degree {degree} are incompatible: "
        f"need n_kv_heads % degree == 0 (KV heads are split) or degree % n_kv_heads == 0 "
        f"(KV heads are replicated)"
    )


def repeat_kv_heads(t: torch.Tensor, times: int) -> torch.Tensor:
    """``(B, S, h, D) -> (B, S, h * times, D)``: head ``j`` of the result is head ``j // times``."""
    return t if times == 1 else t.repeat_interleave(times, dim=2)


def sum_kv_heads(t: torch.Tensor, times: int) -> torch.Tensor:
    """Gradient of :func:`repeat_kv_heads`: ``(B, S, h * times, D) -> (B, S, h, D)``, the sum of
    each head's ``times`` consecutive replicas."""
    if times == 1:
        return t
    b, s, h, d = t.shape
    return t.reshape(b, s, h // times, times, d).sum(dim=3)
