"""Ulysses context-parallel attention (DeepSpeed-Ulysses) on the kernel layer.

Algorithm, for ``C`` ranks in ``group``::

    q (B, S/C, H, D), k/v (B, S/C, H_kv, D)        sequence-sharded, rank r = tokens [rS/C, (r+1)S/C)
      | replicate KV heads x rho when C % H_kv == 0 (see heads.py)
      | all-to-all seq->head: q, and k|v fused into one buffer
    q (B, S, H/C, D), k/v (B, S, H_kv*rho/C, D)     head-sharded, rank r = heads [rH/C, (r+1)H/C)
      | causal attention over the whole sequence (kernel layer; no causal imbalance)
    o (B, S, H/C, D)
      | all-to-all head->seq
    o (B, S/C, H, D)                                canonical head order

Collectives per call: 3 all-to-alls forward (q, k|v, o) and 3 backward (do, dq, dk|dv).
Every piece is differentiable: the all-to-alls' backward is the inverse all-to-all, the
replication's backward sums the replicas, and the attention's backward is the kernel's.
"""

from __future__ import annotations

import torch

from .comm import ProcessGroup, all_to_all_head_to_seq, all_to_all_seq_to_head, group_size
from .gqa import kv_replication
from .kernels import AttentionKernel, kernel_attention, resolve_kernel


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: ProcessGroup | None,
    causal: bool = True,
    scale: float | None = None,
    kernel: str | AttentionKernel = "auto",
) -> torch.Tensor:
    """Causal attention of this rank's contiguous sequence shard against the whole sequence.

    Args:
        q: ``(B, S/C, H, D)``, rank ``r``'s tokens ``[r*S/C, (r+1)*S/C)``.
        k, v: ``(B, S/C, H_kv, D)``, the same tokens.
        group: the ``C`` context-parallel ranks, ordered by sequence shard; ``None`` = no CP.
        causal: causal mask over global positions.
        scale: softmax scale, default ``D ** -0.5``.
        kernel: a kernel name (``[context_parallel] kernel``) or an :class:`AttentionKernel`.

    Returns:
        ``(B, S/C, H, D)``: this rank's tokens, all heads, canonical head order.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("ulysses_attention takes (B, S/C, H, D) tensors")
    c = group_size(group)
    n_heads, n_kv = q.shape[2], k.shape[2]
    rho = kv_replication(n_heads, n_kv, c)
    kern = resolve_kernel(kernel, q.device)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if rho > 1:
        k = k.repeat_interleave(rho, dim=2)
        v = v.repeat_interleave(rho, dim=2)
    # one all-to-all for K and V: interleave them per KV head so that head group r of the
    # fused buffer is exactly rank r's K and V heads.
    b, s, hkv, d = k.shape
    kv = torch.stack((k, v), dim=3).reshape(b, s, 2 * hkv, d)
    qh = all_to_all_seq_to_head(q, group)
    kvh = all_to_all_seq_to_head(kv, group).unflatten(2, (hkv // c, 2))
    out = kernel_attention(
        qh, kvh[:, :, :, 0], kvh[:, :, :, 1], kernel=kern, causal=causal, scale=scale
    )
    return all_to_all_head_to_seq(out, group)
