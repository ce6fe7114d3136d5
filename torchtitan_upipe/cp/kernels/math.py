"""Exact attention in plain tensor algebra: any device, any dtype (float64 for tests).

Materializes the ``(B, H, S_q, S_k)`` score matrix, so it is the reference and the
small-shape CPU fallback, not a long-context kernel.  Scores and softmax are computed in
float32, or float64 when the inputs are float64.
"""

from __future__ import annotations

import torch

from .base import AttentionKernel, check_shapes


def _expand_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    # (B, S, H_kv, D) -> (B, S, H_kv * groups, D), head h -> kv head h // groups
    return t if groups == 1 else t.repeat_interleave(groups, dim=2)


def _reduce_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    # inverse of _expand_kv for gradients: sum the replicas of each kv head
    if groups == 1:
        return t
    b, s, h, d = t.shape
    return t.view(b, s, h // groups, groups, d).sum(dim=3)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _causal_mask(s_q: int, s_k: int, device: torch.device) -> torch.Tensor:
    i = torch.arange(s_q, device=device).unsqueeze(1)
    j = torch.arange(s_k, device=device).unsqueeze(0)
    return j > i  # True = masked


class MathKernel(AttentionKernel):
    name = "math"

    def forward(self, q, k, v, *, causal, scale):
        check_shapes(q, k, v)
        groups = q.shape[2] // k.shape[2]
        ct = _compute_dtype(q)
        qf = q.to(ct).transpose(1, 2)  # B H S D
        kf = _expand_kv(k, groups).to(ct).transpose(1, 2)
        vf = _expand_kv(v, groups).to(ct).transpose(1, 2)
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
        ct = _compute_dtype(q)
        qf = q.to(ct).transpose(1, 2)
        kf = _expand_kv(k, groups).to(ct).transpose(1, 2)
        vf = _expand_kv(v, groups).to(ct).transpose(1, 2)
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
        dk = _reduce_kv(dk.transpose(1, 2), groups).to(k.dtype)
        dv = _reduce_kv(dv.transpose(1, 2), groups).to(v.dtype)
        return dq, dk, dv
