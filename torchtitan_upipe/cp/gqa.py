"""Head-count rules shared by the Ulysses-family styles.

An all-to-all over ``C`` ranks gives each rank ``H / C`` query heads, so ``H % C == 0``.
Rank ``r`` then holds query heads ``[r*H/C, (r+1)*H/C)``, whose key/value heads (canonical GQA:
query head ``h`` uses KV head ``h // g``, ``g = H / H_kv``) are:

* ``H_kv % C == 0``: KV heads ``[r*H_kv/C, (r+1)*H_kv/C)`` -- K/V travel with their own
  ``H_kv`` heads, no duplication.
* ``C % H_kv == 0``: the single KV head ``r // (C/H_kv)``.  Each KV head is replicated to the
  ``C/H_kv`` ranks that need it (in the computation, never by mutating parameters); the
  gradients of the replicas are summed by the replication's backward.
* otherwise no rank layout exists: an error.
"""

from __future__ import annotations


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
