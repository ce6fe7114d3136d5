"""Exact attention in plain tensor algebra: any device, any dtype (float64 for tests).

Materializes the ``(B, H, S_q, S_k)`` score matrix, so it is the reference and the
small-shape CPU fallback, not a long-context kernel.  Scores and softmax are computed in
float32, or float64 when the inputs are float64 (:mod:`..precision`).
"""

from __future__ import annotations

import torch

from ..gqa import repeat_kv_heads, sum_kv_heads
from ..precision import accumulation_dtype
from .base import AttentionKernel, check_shapes
from .registry import register_kernel


def _causal_mask(s_q: int, s_k: int, device: torch.device) -> torch.Tensor:
    i = torch.arange(s_q, device=device).unsqueeze(1)
    j = torch.arange(s_k, device=device).unsqueeze(0)
    return j > i  # True = masked


@register_kernel
class MathKernel(AttentionKernel):
    name = "math"

    def forward(self, q, k, v, *, causal, scale):
        check_shapes(q, k, v)
        groups = q.shape[2] // k.shape[2]
        ct = accumulation_dtype(q.dtype)
        qf = q.to(ct).transpose(1, 2)  # B H S D
        kf = repeat_kv_heads(k, groups).to(ct).transpose(1, 2)
        vf = repeat_kv_heads(v, groups).to(ct).transpose(1, 2)
        scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
        if causal:
            scores = scores.masked_fill(
                _causal_mask(q.shape[1], k.shape[1], q.device), float("-inf")
            )
        lse = torch.logsumexp(scores, dim=-1)  # B H S
        probs = torch.exp(scores - lse.unsqueeze(-1))
        out = torch.matmul(probs, vf).transpose(1, 2).to(q.dtype)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, *, causal, scale):
        groups = q.shape[2] // k.shape[2]
        ct = accumulation_dtype(q.dtype)
        qf = q.to(ct).transpose(1, 2)
        kf = repeat_kv_heads(k, groups).to(ct).transpose(1, 2)
        vf = repeat_kv_heads(v, groups).to(ct).transpose(1, 2)
        do = dout.to(ct).transpose(1, 2)
        o = out.to(ct).transpose(1, 2)
        scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
        if causal:
            scores = scores.masked_fill(
                _causal_mask(q.shape[1], k.shape[1], q.device), float("-inf")
            )
        probs = torch.exp(scores - lse.to(ct).unsqueeze(-1))
        dv = torch.matmul(probs.transpose(-1, -2), do)
        dp = torch.matmul(do, vf.transpose(-1, -2))
        delta = (do * o).sum(dim=-1, keepdim=True)
        ds = probs * (dp - delta) * scale
        dq = torch.matmul(ds, kf)
        dk = torch.matmul(ds.transpose(-1, -2), qf)
        dq = dq.transpose(1, 2).to(q.dtype)
        dk = sum_kv_heads(dk.transpose(1, 2), groups).to(k.dtype)
        dv = sum_kv_heads(dv.transpose(1, 2), groups).to(v.dtype)
        return dq, dk, dv
