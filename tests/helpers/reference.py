"""Plain single-device references the distributed implementations are checked against.

Written with nothing but torch autograd and the textbook formulas, independent of the
plugin's kernels, all-to-alls and schedules.
"""

from __future__ import annotations

import torch


def attention(q, k, v, *, causal=True, scale=None):
    """softmax(q k^T * scale + causal mask) v.  q (B,S,H,D), k/v (B,S,H_kv,D) -> (B,S,H,D)."""
    b, s, h, d = q.shape
    g = h // k.shape[2]
    scale = d**-0.5 if scale is None else scale
    kk = k.repeat_interleave(g, dim=2).transpose(1, 2)
    vv = v.repeat_interleave(g, dim=2).transpose(1, 2)
    scores = q.transpose(1, 2) @ kk.transpose(-1, -2) * scale
    if causal:
        mask = torch.ones(s, k.shape[1], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return (scores.softmax(-1) @ vv).transpose(1, 2)


def rope(x, freqs_cis):
    """TorchTitan's complex RoPE: x (B,S,H,D) as D/2 complex pairs times freqs_cis (S, D/2)."""
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    f = freqs_cis.to(xc.dtype)[None, :, None, :]
    return torch.view_as_real(xc * f).flatten(3)


def projected_attention(x, wq, wk, wv, freqs_cis, n_heads, n_kv_heads, *, causal=True):
    """The Llama attention block up to (excluding) wo: returns (B, S, H*D)."""
    b, s, _ = x.shape
    d = wq.shape[0] // n_heads
    q = (x @ wq.T).view(b, s, n_heads, d)
    k = (x @ wk.T).view(b, s, n_kv_heads, d)
    v = (x @ wv.T).view(b, s, n_kv_heads, d)
    q, k = rope(q, freqs_cis), rope(k, freqs_cis)
    return attention(q, k, v, causal=causal).reshape(b, s, n_heads * d)
