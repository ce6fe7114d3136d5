"""A differentiable front end for any :class:`~.base.AttentionKernel`.

``kernel_attention(q, k, v, kernel=...)`` runs ``kernel.forward`` under autograd and
``kernel.backward`` for the gradients, saving ``q, k, v, out, lse`` (the layout contract of
:mod:`.base`: ``q (B, S_q, H, D)``, ``k, v (B, S_k, H_kv, D)`` -> ``out (B, S_q, H, D)``).
"""

from __future__ import annotations

import torch

from .base import AttentionKernel
from .registry import resolve_kernel_and_scale


class _KernelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kernel, causal, scale):
        out, lse = kernel.forward(q, k, v, causal=causal, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.kernel, ctx.causal, ctx.scale = kernel, causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.kernel.backward(
            dout, q, k, v, out, lse, causal=ctx.causal, scale=ctx.scale
        )
        return dq, dk, dv, None, None, None


def kernel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     kernel: AttentionKernel | str, causal: bool = True,
                     scale: float | None = None) -> torch.Tensor:
    """Differentiable attention through ``kernel`` (an instance, or a name for ``get_kernel``).

    Returns ``out`` only; the LSE is kept internally for the backward.  ``scale`` defaults
    to ``D ** -0.5``.
    """
    kernel, scale = resolve_kernel_and_scale(kernel, q.device, q.shape[-1], scale)
    return _KernelAttention.apply(q, k, v, kernel, causal, scale)
