"""Plain single-device references the distributed implementations are checked against.

Written with nothing but torch autograd and the textbook formulas, independent of the
plugin's kernels, all-to-alls and schedules.
"""

from __future__ import annotations

import torch


def attention(q, k, v, *, causal=True, scale=None, doc_ids=None):
    """softmax(q k^T * scale + causal mask) v.  q (B,S,H,D), k/v (B,S,H_kv,D) -> (B,S,H,D).

    ``doc_ids (B, S)``: each token's document; keys of other documents are masked too (the
    explicit block-diagonal causal mask of packed documents)."""
    return attention_and_lse(q, k, v, causal=causal, scale=scale, doc_ids=doc_ids)[0]


def attention_and_lse(q, k, v, *, causal=True, scale=None, doc_ids=None):
    """:func:`attention` and the log-sum-exp of its masked scores ``(B, H, S)``."""
    b, s, h, d = q.shape
    g = h // k.shape[2]
    scale = d**-0.5 if scale is None else scale
    kk = k.repeat_interleave(g, dim=2).transpose(1, 2)
    vv = v.repeat_interleave(g, dim=2).transpose(1, 2)
    scores = q.transpose(1, 2) @ kk.transpose(-1, -2) * scale
    if causal:
        mask = torch.ones(s, k.shape[1], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    if doc_ids is not None:
        other = doc_ids[:, :, None] != doc_ids[:, None, :]  # (B, S_q, S_k)
        scores = scores.masked_fill(other[:, None].to(q.device), float("-inf"))
    return (scores.softmax(-1) @ vv).transpose(1, 2), torch.logsumexp(scores, dim=-1)


def rope(x, freqs_cis):
    """TorchTitan's complex RoPE: x (B,S,H,D) as D/2 complex pairs times freqs_cis (S, D/2),
    computed in at least float32 (bf16/fp16 have no complex type) and returned in x's dtype."""
    xc = torch.view_as_complex(
        x.to(torch.promote_types(x.dtype, torch.float32)).reshape(*x.shape[:-1], -1, 2).contiguous())
    f = freqs_cis.to(xc.dtype)[None, :, None, :]
    return torch.view_as_real(xc * f).flatten(3).to(x.dtype)


def freqs_cis(seq: int, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """TorchTitan's complex64 RoPE table ``(seq, head_dim/2)``, the angles formed in float64."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.outer(torch.arange(seq, dtype=torch.float64), inv)
    return torch.polar(torch.ones_like(ang), ang).to(torch.complex64)


def attention_case(b, seq, h, h_kv, d, *, causal=True, seed=0):
    """float64 leaves ``q (b,seq,h,d)``, ``k, v (b,seq,h_kv,d)`` whose ``.grad`` holds the
    reference's gradients for ``dout``; returns ``(q, k, v, dout, out)``, ``out`` detached."""
    torch.manual_seed(seed)
    q = torch.randn(b, seq, h, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, seq, h_kv, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, seq, h_kv, d, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(b, seq, h, d, dtype=torch.float64)
    out = attention(q, k, v, causal=causal)
    out.backward(dout)
    return q, k, v, dout, out.detach()


def projected_attention(x, wq, wk, wv, freqs_cis, n_heads, n_kv_heads, *, causal=True,
                        attend=None):
    """The Llama attention block up to (excluding) wo: returns (B, S, H*D).  ``attend(q, k, v)``
    replaces the textbook causal :func:`attention` (e.g. torch's SDPA on a GPU)."""
    b, s, _ = x.shape
    d = wq.shape[0] // n_heads
    q = (x @ wq.T).view(b, s, n_heads, d)
    k = (x @ wk.T).view(b, s, n_kv_heads, d)
    v = (x @ wv.T).view(b, s, n_kv_heads, d)
    q, k = rope(q, freqs_cis), rope(k, freqs_cis)
    out = attention(q, k, v, causal=causal) if attend is None else attend(q, k, v)
    return out.reshape(b, s, n_heads * d)
