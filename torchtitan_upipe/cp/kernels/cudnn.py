"""torch's cuDNN attention (``kernel = "cudnn"``): CUDA only, exercised only on GPU machines.

Layout contract (see :mod:`.base`): ``q (B, S_q, H, D)``, ``k, v (B, S_k, H_kv, D)``;
``out (B, S_q, H, D)``; ``lse (B, H, S_q)`` float32.  The aten ops take ``(B, H, S, D)``
tensors: the kernel passes BSHD-contiguous tensors as ``transpose(1, 2)`` views.

* dtypes: float16/bfloat16 (what cuDNN's fused attention supports).
* LSE: cuDNN returns its softmax statistics as natural-log LSE shaped ``(B, H, S_q, 1)``;
  the trailing dim is squeezed in ``forward`` and restored (on a contiguous float32 copy) in
  ``backward``.
* GQA: K/V are expanded to ``H`` heads (:func:`..gqa.repeat_kv_heads`) before the call and the
  replicas' ``dk``/``dv`` summed afterwards (:func:`..gqa.sum_kv_heads`), so the op always sees equal head counts.
* ``out`` and ``dout`` are given to the backward as BSHD-contiguous tensors, so they share
  strides (cuDNN's backward graph assumes ``dO`` is laid out like ``O``).
"""

from __future__ import annotations

import torch

from ..gqa import repeat_kv_heads, sum_kv_heads
from .base import AttentionKernel, check_causal_alignment, check_shapes
from .registry import register_kernel


def _to_bhsd(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().transpose(1, 2)


@register_kernel
class CudnnKernel(AttentionKernel):
    """``aten._scaled_dot_product_cudnn_attention`` forward/backward with the LSE kept."""

    name = "cudnn"

    def unavailable_reason(self, device: torch.device) -> str | None:
        device = torch.device(device)
        if device.type != "cuda":
            return f"cuDNN attention needs a CUDA device, got {device.type}"
        if not torch.backends.cudnn.is_available():
            return "this torch build has no cuDNN"
        return None

    def forward(self, q, k, v, *, causal, scale):
        check_shapes(q, k, v)
        check_causal_alignment(q, k, causal, self.name)
        groups = q.shape[2] // k.shape[2]
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            _to_bhsd(q),
            _to_bhsd(repeat_kv_heads(k, groups)),
            _to_bhsd(repeat_kv_heads(v, groups)),
            None,  # attn_bias
            True,  # compute_log_sumexp
            0.0,  # dropout_p
            causal,
            False,  # return_debug_mask
            scale=scale,
        )
        out, lse = res[0], res[1]  # (B, H, S_q, D), (B, H, S_q, 1) float32
        return out.transpose(1, 2), lse.squeeze(-1)

    def backward(self, dout, q, k, v, out, lse, *, causal, scale):
        """Rebuilds the forward's extra outputs for ``dropout_p=0``: dense path (``cum_seq``
        ``None``), ``max_q/max_k = S_q/S_k``, zero ``(1,)`` int64 philox seed/offset on the
        device (what the cuDNN forward itself returns without dropout; never read then)."""
        check_causal_alignment(q, k, causal, self.name)
        groups = q.shape[2] // k.shape[2]
        seed = torch.zeros(1, dtype=torch.int64, device=q.device)
        offset = torch.zeros(1, dtype=torch.int64, device=q.device)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            _to_bhsd(dout),
            _to_bhsd(q),
            _to_bhsd(repeat_kv_heads(k, groups)),
            _to_bhsd(repeat_kv_heads(v, groups)),
            _to_bhsd(out),
            lse.to(torch.float32).contiguous().unsqueeze(-1),
            seed,
            offset,
            None,  # attn_bias
            None,  # cum_seq_q
            None,  # cum_seq_k
            q.shape[1],
            k.shape[1],
            0.0,
            causal,
            scale=scale,
        )
        dk = sum_kv_heads(dk.transpose(1, 2), groups)
        dv = sum_kv_heads(dv.transpose(1, 2), groups)
        return dq.transpose(1, 2), dk, dv
