"""Ulysses context-parallel attention (DeepSpeed-Ulysses) on the kernel layer.

Algorithm, for ``C`` ranks in ``group``::

    q (B, S/C, H, D), k/v (B, S/C, H_kv, D)        sequence-sharded, rank r = tokens [rS/C, (r+1)S/C)
      | replicate KV heads x rho when C % H_kv == 0 (see gqa.py)
      | all-to-all seq->head: q, and k|v fused into one buffer (comm.pack_pair)
    q (B, S, H/C, D), k/v (B, S, H_kv*rho/C, D)     head-sharded, rank r = heads [rH/C, (r+1)H/C)
      | causal attention over the whole sequence (kernel layer; no causal imbalance),
      | inside each packed document when ``documents`` are given (documents.DocumentKernel)
    o (B, S, H/C, D)
      | all-to-all head->seq
    o (B, S/C, H, D)                                canonical head order

Collectives per call: 3 all-to-alls forward (q, k|v, o) and 3 backward (do, dq, dk|dv).
With a kept result (``keep``, :mod:`.replay`) the recompute under activation checkpointing
skips the kernel forward but still runs the three forward all-to-alls: the kernel's
backward needs the head-sharded q, k and v.
Every piece is differentiable: the all-to-alls' backward is the inverse all-to-all, the
replication's backward sums the replicas, and the attention's backward is the kernel's.
"""

from __future__ import annotations

import torch

from .comm import (
    ProcessGroup,
    all_to_all_head_to_seq,
    all_to_all_seq_to_head,
    group_size,
    pack_pair,
    unpack_pair,
)
from .documents import DocumentKernel, Documents
from .gqa import kv_replication, repeat_kv_heads
from .kernels import AttentionKernel, kernel_attention, resolve_kernel_and_scale
from .replay import AttentionSlot, ReplayKernel


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: ProcessGroup | None,
    causal: bool = True,
    scale: float | None = None,
    kernel: str | AttentionKernel = "auto",
    documents: Documents | None = None,
    keep: AttentionSlot | None = None,
) -> torch.Tensor:
    """Causal attention of this rank's contiguous sequence shard against the whole sequence.

    Args:
        q: ``(B, S/C, H, D)``, rank ``r``'s tokens ``[r*S/C, (r+1)*S/C)``.
        k, v: ``(B, S/C, H_kv, D)``, the same tokens.
        group: the ``C`` context-parallel ranks, ordered by sequence shard; ``None`` = no CP.
        causal: causal mask over global positions.
        scale: softmax scale, default ``D ** -0.5``.
        kernel: a kernel name (``[context_parallel] kernel``) or an :class:`AttentionKernel`.
        documents: the packed documents of the whole ``(B, S)`` batch: causal attention inside
            each (needs ``causal``).  ``None``: one causal sequence per row.
        keep: this layer's kept attention result (:mod:`.replay`): recorded while the slot
            records, replayed instead of the kernel forward while it replays.

    Returns:
        ``(B, S/C, H, D)``: this rank's tokens, all heads, canonical head order.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("ulysses_attention takes (B, S/C, H, D) tensors")
    c = group_size(group)
    n_heads, n_kv = q.shape[2], k.shape[2]
    rho = kv_replication(n_heads, n_kv, c)
    kern, scale = resolve_kernel_and_scale(kernel, q.device, q.shape[-1], scale)
    if documents is not None:
        kern = DocumentKernel(kern, documents)
    if keep is not None:  # outermost: one record per call, not per document or ring step
        kern = ReplayKernel(kern, keep)
    k = repeat_kv_heads(k, rho)
    v = repeat_kv_heads(v, rho)
    kv = pack_pair(k, v)  # one all-to-all for K and V
    qh = all_to_all_seq_to_head(q, group)
    kh, vh = unpack_pair(all_to_all_seq_to_head(kv, group))
    out = kernel_attention(qh, kh, vh, kernel=kern, causal=causal, scale=scale)
    return all_to_all_head_to_seq(out, group)
