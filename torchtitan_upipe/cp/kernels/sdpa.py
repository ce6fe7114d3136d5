"""torch's own flash-attention kernels (``kernel = "sdpa"``), called through their aten ops.

Layout contract (see :mod:`.base`): ``q (B, S_q, H, D)``, ``k, v (B, S_k, H_kv, D)`` with
``H % H_kv == 0``; ``out (B, S_q, H, D)``; ``lse (B, H, S_q)``.  The aten ops take
``(B, H, S, D)``: the kernel hands them ``transpose(1, 2)`` views (no copy) and transposes the
results back, so BSHD-contiguous inputs give BSHD-contiguous ``out``/``dq``/``dk``/``dv``.

CPU (``_scaled_dot_product_flash_attention_for_cpu`` and its ``_backward``):

* dtypes: float64, float32, bfloat16 and float16 all run.  ``lse`` is returned exactly as the
  op gives it: float64 for float64 inputs, float32 otherwise, shaped ``(B, H, S_q)`` but laid
  out as a transposed view of a ``(B, S_q, H)`` buffer (not contiguous).
* GQA: the op handles ``H_kv < H`` natively in forward and backward (query head ``h`` reads
  kv head ``h // (H // H_kv)``; ``dk``/``dv`` come back with ``H_kv`` heads), verified against
  the math kernel in ``tests/cp/test_kernels.py``, so K/V are never repeated.
* causal masking is top-left aligned (key ``j`` masked for query ``i`` when ``j > i``), as the
  contract requires, also for ``S_q != S_k``.

CUDA (``_scaled_dot_product_flash_attention`` and its ``_backward``): exercised only on GPU
machines, never by the CPU test suite.  It is FlashAttention-2 inside aten: float16/bfloat16
only (anything else is rejected here with a clear error), ``lse`` float32 ``(B, H, S_q)``.
GQA is passed through unexpanded: the aten wrapper does no head-count check and forwards to
``mha_fwd``/``mha_bwd``, which take ``num_heads_k`` and sum ``dk``/``dv`` over each group
themselves (this is what ``F.scaled_dot_product_attention(enable_gqa=True)`` relies on).
"""

from __future__ import annotations

import torch

from ..precision import accumulation_dtype
from .base import AttentionKernel, check_causal_alignment, check_fa2_backward, check_shapes
from .registry import register_kernel

_CUDA_DTYPES = (torch.float16, torch.bfloat16)


def _to_bhsd(t: torch.Tensor) -> torch.Tensor:
    """(B, S, H, D) -> (B, H, S, D) view; copy only when the last dim is not unit-stride."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.transpose(1, 2)


@register_kernel
class SdpaKernel(AttentionKernel):
    """torch's flash attention: the CPU flash kernel on CPU, FlashAttention-2 on CUDA."""

    name = "sdpa"

    def unavailable_reason(self, device: torch.device) -> str | None:
        device = torch.device(device)
        if device.type in ("cpu", "cuda"):
            return None
        return f"the sdpa kernel runs on cpu and cuda devices only, not {device.type}"

    # ------------------------------------------------------------------ forward
    def forward(self, q, k, v, *, causal, scale):
        check_shapes(q, k, v)
        if q.device.type == "cuda":
            return self._forward_cuda(q, k, v, causal=causal, scale=scale)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _to_bhsd(q), _to_bhsd(k), _to_bhsd(v), 0.0, causal, attn_mask=None, scale=scale
        )
        return out.transpose(1, 2), lse

    def _forward_cuda(self, q, k, v, *, causal, scale):
        """GPU only: aten FlashAttention-2; GQA native (see module docstring)."""
        _check_cuda_dtype(q)
        check_causal_alignment(q, k, causal, self.name)
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            _to_bhsd(q), _to_bhsd(k), _to_bhsd(v), 0.0, causal, False, scale=scale
        )
        out, lse = res[0], res[1]  # (B, H, S_q, D), (B, H, S_q) float32
        return out.transpose(1, 2), lse

    # ----------------------------------------------------------------- backward
    def backward(self, dout, q, k, v, out, lse, *, causal, scale):
        if q.device.type == "cuda":
            return self._backward_cuda(dout, q, k, v, out, lse, causal=causal, scale=scale)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _to_bhsd(dout),
            _to_bhsd(q),
            _to_bhsd(k),
            _to_bhsd(v),
            _to_bhsd(out),
            lse.to(accumulation_dtype(q.dtype)),
            0.0,
            causal,
            attn_mask=None,
            scale=scale,
        )
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)

    def _backward_cuda(self, dout, q, k, v, out, lse, *, causal, scale):
        """GPU only.  Arguments the forward would have returned, rebuilt for ``dropout_p=0``.

        * ``cum_seq_q``/``cum_seq_k``: ``None`` (undefined tensors: the dense, non-varlen path;
          this is what the forward returns for dense inputs).
        * ``max_q``/``max_k``: the sequence lengths ``S_q``/``S_k``.
        * ``philox_seed``/``philox_offset``: zero tensors shaped like the forward's
          (``(2,)`` and ``()`` uint64); ``mha_bwd`` reads them only when ``dropout_p > 0``.
        * ``lse`` is made contiguous float32: ``mha_bwd`` indexes it as a dense (B, H, S_q)
          buffer through its data pointer.

        A call whose dQ-accumulator offsets overflow 32 bits is refused
        (:func:`~.base.check_fa2_backward`).
        """
        _check_cuda_dtype(q)
        check_causal_alignment(q, k, causal, self.name)
        check_fa2_backward(q, self.name)
        seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
        offset = torch.zeros((), dtype=torch.uint64, device=q.device)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            _to_bhsd(dout),
            _to_bhsd(q),
            _to_bhsd(k),
            _to_bhsd(v),
            _to_bhsd(out),
            lse.to(torch.float32).contiguous(),
            None,
            None,
            q.shape[1],
            k.shape[1],
            0.0,
            causal,
            seed,
            offset,
            scale=scale,
        )
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)

    # ----------------------------------------------- varlen (packed documents, CUDA only)
    def varlen_on(self, device: torch.device) -> bool:
        """The varlen path runs on CUDA (FlashAttention-2); the CPU flash kernel has none."""
        return device.type == "cuda"

    def forward_varlen(self, q, k, v, cu_seqlens, max_len, *, scale):
        """Causal attention inside each document in one FlashAttention-2 varlen call.

        ``q (T, H, D)``, ``k, v (T, H_kv, D)``: the ``T = B * S`` tokens of the batch
        flattened; ``cu_seqlens`` int32 on the device, the documents' offsets
        (:class:`~torchtitan_upipe.cp.documents.Documents`); ``max_len`` the longest.
        Returns ``out (T, H, D)`` and ``lse (H, T)`` float32 (aten's varlen layout).  GQA is
        native, as in the dense call.
        """
        _check_cuda_dtype(q)
        res = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, True, False, scale=scale)
        out, lse = res[0], res[1]
        if tuple(lse.shape) != (q.shape[1], q.shape[0]):
            raise RuntimeError(
                f"FlashAttention-2's varlen forward returned an LSE of shape {tuple(lse.shape)}, "
                f"not (heads, tokens) = {(q.shape[1], q.shape[0])}: this torch build's layout is "
                f"not the one the document kernel reads; use context_parallel.kernel='cudnn' "
                f"(one call per document)")
        return out, lse

    def backward_varlen(self, dout, q, k, v, out, lse, cu_seqlens, max_len, *, scale):
        """The gradients of :meth:`forward_varlen` (same layouts); ``lse (H, T)``.  The random
        state arguments are zero tensors, as in the dense backward (no dropout)."""
        _check_cuda_dtype(q)
        check_fa2_backward(q.unsqueeze(0), self.name)
        seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
        offset = torch.zeros((), dtype=torch.uint64, device=q.device)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout, q, k, v, out, lse.to(torch.float32).contiguous(), cu_seqlens, cu_seqlens,
            max_len, max_len, 0.0, True, seed, offset, scale=scale)
        return dq, dk, dv


def _check_cuda_dtype(q: torch.Tensor) -> None:
    if q.dtype not in _CUDA_DTYPES:
        raise ValueError(
            f"context_parallel.kernel='sdpa' on CUDA runs FlashAttention-2, which takes "
            f"float16/bfloat16 only, got {q.dtype}; use kernel='math' for other dtypes"
        )
