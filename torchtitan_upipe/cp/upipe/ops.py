"""UPipe as ``torch.library`` custom ops with a registered autograd formula.

``upipe::attention_forward`` and ``upipe::attention_backward`` are opaque to ``torch.compile``
and to DTensor, and selective activation checkpointing can treat the whole staged attention
as one op (save its outputs, never re-run its stages).  The process group crosses the op
boundary by name (``ProcessGroup.group_name``; ``""`` means no group) and the kernel by its
``[context_parallel] kernel`` name.  With a ring group (the UPipe x ring hybrid) each stage's
attention is a ring pass (:class:`~torchtitan_upipe.ring.RingKernel`) over the ring ranks.

Saved for backward: ``x``, the three weights, ``freqs_cis``, the output and the per-stage LSE.
No Q, K or V.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
import torch.distributed as dist

from ..comm import ProcessGroup, group_size
from ..kernels import AttentionKernel, get_kernel
from .functional import lse_dtype, upipe_backward, upipe_forward
from .schedule import UPipeSchedule


def _group(name: str) -> ProcessGroup | None:
    if not name:
        return None
    return dist.distributed_c10d._resolve_process_group(name)


@functools.lru_cache(maxsize=None)
def _base_kernel(name: str, device_type: str) -> AttentionKernel:
    return get_kernel(name, torch.device(device_type))


def _kernel(name: str, device_type: str, ring_group_name: str) -> AttentionKernel:
    kernel = _base_kernel(name, device_type)
    if ring_group_name:
        from ..ring import RingKernel

        kernel = RingKernel(_group(ring_group_name), kernel)
    return kernel


def _schedule(n_heads, n_kv_heads, chunk_heads, group) -> UPipeSchedule:
    return UPipeSchedule(n_heads, n_kv_heads, group_size(group), chunk_heads)


@torch.library.custom_op("upipe::attention_forward", mutates_args=())
def attention_forward(
    x: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    freqs_cis: torch.Tensor,
    n_heads: int,
    n_kv_heads: int,
    chunk_heads: int,
    group_name: str,
    ring_group_name: str,
    causal: bool,
    scale: float,
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_impl(x, wq, wk, wv, freqs_cis, n_heads, n_kv_heads, chunk_heads, group_name,
                         ring_group_name, causal, scale, kernel)


def _forward_impl(x, wq, wk, wv, freqs_cis, n_heads, n_kv_heads, chunk_heads, group_name,
                  ring_group_name, causal, scale, kernel):
    group = _group(group_name)
    return upipe_forward(
        x, wq, wk, wv, freqs_cis,
        _schedule(n_heads, n_kv_heads, chunk_heads, group),
        group, _kernel(kernel, x.device.type, ring_group_name), causal, scale,
    )


@attention_forward.register_fake
def _(x, wq, wk, wv, freqs_cis, n_heads, n_kv_heads, chunk_heads, group_name, ring_group_name,
      causal, scale, kernel):
    b, s, _ = x.shape
    c = group_size(_group(group_name))
    out = x.new_empty(b, s, wq.shape[0])
    lse = x.new_empty(n_heads // chunk_heads, b, chunk_heads // c, s * c, dtype=lse_dtype(x.dtype))
    return out, lse


@torch.library.custom_op("upipe::attention_backward", mutates_args=())
def attention_backward(
    dout: torch.Tensor,
    x: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    freqs_cis: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    n_heads: int,
    n_kv_heads: int,
    chunk_heads: int,
    group_name: str,
    ring_group_name: str,
    causal: bool,
    scale: float,
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(dout, x, wq, wk, wv, freqs_cis, out, lse, n_heads, n_kv_heads,
                          chunk_heads, group_name, ring_group_name, causal, scale, kernel)


def _backward_impl(dout, x, wq, wk, wv, freqs_cis, out, lse, n_heads, n_kv_heads, chunk_heads,
                   group_name, ring_group_name, causal, scale, kernel):
    group = _group(group_name)
    return upipe_backward(
        dout.contiguous(), x, wq, wk, wv, freqs_cis, out, lse,
        _schedule(n_heads, n_kv_heads, chunk_heads, group),
        group, _kernel(kernel, x.device.type, ring_group_name), causal, scale,
    )


@attention_backward.register_fake
def _(dout, x, wq, wk, wv, freqs_cis, out, lse, *args):
    return torch.empty_like(x), torch.empty_like(wq), torch.empty_like(wk), torch.empty_like(wv)


_ARGS = ("n_heads", "n_kv_heads", "chunk_heads", "group_name", "ring_group_name", "causal", "scale", "kernel")


def _setup_context(ctx, inputs, output):
    x, wq, wk, wv, freqs_cis, *rest = inputs
    out, lse = output
    ctx.save_for_backward(x, wq, wk, wv, freqs_cis, out, lse)
    ctx.static = dict(zip(_ARGS, rest))
    ctx.mark_non_differentiable(lse)


def _grads(ctx, dout, backward_fn):
    """Input grads from the tensors and arguments :func:`_setup_context` saved, by
    ``backward_fn`` (the backward op, or its implementation for :class:`_InlineAttention`)."""
    x, wq, wk, wv, freqs_cis, out, lse = ctx.saved_tensors
    dx, dwq, dwk, dwv = backward_fn(dout, x, wq, wk, wv, freqs_cis, out, lse,
                                    *(ctx.static[k] for k in _ARGS))
    return (dx, dwq, dwk, dwv) + (None,) * (1 + len(_ARGS))


def _backward(ctx, dout, _dlse):
    return _grads(ctx, dout, attention_backward)


attention_forward.register_autograd(_backward, setup_context=_setup_context)


class _InlineAttention(torch.autograd.Function):
    """The op's forward and backward without the custom-op boundary, so each aten op of the
    stages is dispatched on its own.  For the CPU memory estimator: under ``FakeTensorMode``
    a custom op runs only its fake (output-shape) function, which hides the stages' buffers."""

    @staticmethod
    def forward(ctx, x, wq, wk, wv, freqs_cis, *static):
        out, lse = _forward_impl(x, wq, wk, wv, freqs_cis, *static)
        _setup_context(ctx, (x, wq, wk, wv, freqs_cis, *static), (out, lse))
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        return _grads(ctx, dout, _backward_impl)


_INLINE = False


@contextlib.contextmanager
def inline_ops() -> Iterator[None]:
    """Within the block, :func:`upipe_attention` runs :class:`_InlineAttention` instead of the
    custom ops (same values and gradients; not traceable by ``torch.compile``)."""
    global _INLINE
    previous, _INLINE = _INLINE, True
    try:
        yield
    finally:
        _INLINE = previous


def upipe_attention(
    x: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    freqs_cis: torch.Tensor,
    *,
    n_heads: int,
    n_kv_heads: int,
    chunk_heads: int | None = None,
    group: ProcessGroup | None = None,
    ring_group: ProcessGroup | None = None,
    causal: bool = True,
    scale: float | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Fused projection + RoPE + UPipe context-parallel attention.

    Args:
        x: ``(B, S/C, dim)``, this rank's contiguous sequence shard of the normed block input
            (rank ``r`` holds tokens ``[r*S/C, (r+1)*S/C)``).
        wq: ``(n_heads*D, dim)``; wk, wv: ``(n_kv_heads*D, dim)``: canonical ``nn.Linear``
            weights of TorchTitan's Llama3 attention, unsharded.
        freqs_cis: TorchTitan's complex RoPE table ``(S/C, D/2)`` for this rank's positions.
        n_heads, n_kv_heads: H and H_kv.
        chunk_heads: U, query heads per stage across all C ranks: a multiple of C dividing
            n_heads.  ``0``/``None`` = C (least memory).
        group: the C all-to-all ranks ordered by sequence shard; ``None`` = no CP.
        ring_group: for the UPipe x ring hybrid, the ring ranks (see :mod:`torchtitan_upipe.mesh`);
            ``x`` is then this rank's piece of its ring rank's zigzag shard
            (:class:`~torchtitan_upipe.sharding.UlyssesRingSharder`).  ``None`` = no ring.
        causal: causal mask over global positions.
        scale: softmax scale, default ``D ** -0.5``.
        kernel: ``[context_parallel] kernel`` name.

    Returns:
        ``(B, S/C, n_heads*D)`` in canonical head order (input of ``wo``).
    """
    c = group_size(group)
    chunk_heads = chunk_heads or c
    UPipeSchedule(n_heads, n_kv_heads, c, chunk_heads)  # validates U and the head counts
    head_dim = wq.shape[0] // n_heads
    if wq.shape[0] != n_heads * head_dim or wk.shape[0] != n_kv_heads * head_dim or wk.shape != wv.shape:
        raise ValueError(
            f"weights do not match n_heads={n_heads}, n_kv_heads={n_kv_heads}: "
            f"wq{tuple(wq.shape)} wk{tuple(wk.shape)} wv{tuple(wv.shape)}"
        )
    if freqs_cis.shape != (x.shape[1], head_dim // 2):
        raise ValueError(
            f"freqs_cis must be this rank's RoPE rows (S/C, D/2) = {(x.shape[1], head_dim // 2)}, "
            f"got {tuple(freqs_cis.shape)}"
        )
    get_kernel(kernel, x.device)  # fail early with a clear message
    op = _InlineAttention.apply if _INLINE else attention_forward
    out, _ = op(
        x, wq, wk, wv, freqs_cis, n_heads, n_kv_heads, chunk_heads,
        "" if group is None else group.group_name,
        "" if ring_group is None else ring_group.group_name,
        causal, head_dim**-0.5 if scale is None else float(scale), kernel,
    )
    return out
