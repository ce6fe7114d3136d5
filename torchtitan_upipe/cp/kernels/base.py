"""The attention-kernel interface every context-parallel style computes through.

Layout contract (all backends):

* ``q``: ``(B, S_q, H, D)``; ``k`` and ``v``: ``(B, S_k, H_kv, D)`` with ``H % H_kv == 0``.
  Query head ``h`` attends with key/value head ``h // (H // H_kv)`` (GQA, no physical repeat
  is required of the caller).
* ``out``: ``(B, S_q, H, D)`` in the dtype of ``q``.
* ``lse``: ``(B, H, S_q)`` float32 (float64 when the inputs are float64): the natural-log
  log-sum-exp of the scaled scores of each query row.  Rows that see no key (possible only
  with ``causal`` and ``S_q > S_k`` offsets, which no caller uses) have ``lse = -inf``.
* ``causal=True`` masks key ``j`` for query ``i`` when ``j > i`` with both sequences aligned at
  position 0 (top-left alignment, as ``is_causal`` in torch SDPA for ``S_q == S_k``).

``forward`` returns ``(out, lse)`` and ``backward(dout, q, k, v, out, lse)`` returns
``(dq, dk, dv)`` shaped like ``q``, ``k``, ``v``.  The LSE is what makes the kernels
composable: UPipe saves it per stage instead of saving Q/K/V, and ring attention merges
partial outputs with it.
"""

from __future__ import annotations

import abc

import torch


class AttentionKernel(abc.ABC):
    """One attention implementation: a forward that keeps the LSE and a matching backward."""

    #: name used in ``[context_parallel] kernel = ...``
    name: str = ""

    @abc.abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(out, lse)`` for ``q (B,S,H,D)``, ``k, v (B,S,H_kv,D)``."""

    @abc.abstractmethod
    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        *,
        causal: bool,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(dq, dk, dv)`` given the forward's ``out`` and ``lse``."""

    def unavailable_reason(self, device: torch.device) -> str | None:
        """``None`` when this kernel can run on ``device``, else why not (for error messages)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Validate the BSHD/GQA layout contract shared by all kernels."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention kernels take (B, S, H, D) tensors, got q{tuple(q.shape)} "
            f"k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must match")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"batch/head_dim mismatch: q{tuple(q.shape)} k{tuple(k.shape)}")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(
            f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})"
        )


# ------------------------------------------------------------------- CUDA kernels' limits
FA2_OFFSET_LIMIT = 2**31
"""FlashAttention-2's backward (``mha_bwd``, in aten and in flash-attn 2.x) computes the row
offset of its fp32 dQ accumulator, ``(S_q rounded to 128) * H * (D rounded)``, in 32-bit
``int``; at this value it overflows into an illegal memory access."""


def fa2_backward_offset(seq_q: int, heads: int, head_dim: int) -> int:
    """The largest dQ-accumulator offset of a FlashAttention-2 backward call (see
    :data:`FA2_OFFSET_LIMIT`)."""
    d_rounded = -(-head_dim // (32 if head_dim <= 128 else 64)) * (32 if head_dim <= 128 else 64)
    return -(-seq_q // 128) * 128 * heads * d_rounded


def check_fa2_backward(q: torch.Tensor, kernel_name: str) -> None:
    """Refuse a FlashAttention-2 backward call whose offsets would overflow (``q`` BSHD)."""
    offset = fa2_backward_offset(q.shape[1], q.shape[2], q.shape[3])
    if offset >= FA2_OFFSET_LIMIT:
        raise ValueError(
            f"context_parallel.kernel={kernel_name!r}: FlashAttention-2's backward for "
            f"{q.shape[1]} query tokens x {q.shape[2]} heads of {q.shape[3]} would index its "
            f"dQ accumulator past 2^31 ({offset}) in 32-bit arithmetic; use kernel='cudnn', "
            f"fewer heads per call (a smaller upipe_chunk_heads) or a ring dimension"
        )


def check_causal_alignment(q: torch.Tensor, k: torch.Tensor, causal: bool, kernel_name: str) -> None:
    """CUDA kernels align a causal mask to the bottom right when ``S_q != S_k`` (FA2); the
    contract is top-left, so a causal call must have equal query and key lengths there."""
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(
            f"context_parallel.kernel={kernel_name!r} on CUDA takes causal calls with equal query "
            f"and key lengths only (its mask is bottom-right aligned), got {q.shape[1]} and "
            f"{k.shape[1]}"
        )
