"""UPipe as ``torch.library`` custom ops with a registered autograd formula.

``upipe::attention_forward``, ``upipe::projected_attention_forward`` (the same with the
output projection ``wo`` fused, :mod:`.functional`) and ``upipe::attention_backward`` (both
forwards' backward: ``wo`` is ``None`` for the first) are opaque to ``torch.compile`` and to
DTensor, and selective activation checkpointing can treat the whole staged attention as one
op (save its outputs, never re-run its stages).  Besides tensors both ops take
``_STATIC``: ``heads = [H, H_kv, U]``, the all-to-all and ring groups by
``ProcessGroup.group_name`` (``""`` means none), ``causal``, ``scale`` and the
``[context_parallel] kernel`` name.  With a ring group (the UPipe x ring
hybrid) each stage's attention is a ring pass (:class:`~torchtitan_upipe.cp.ring.RingKernel`)
over the ring ranks.  ``cu_seqlens`` (optional, a CPU tensor: no device sync) are the packed
documents' boundaries (:class:`~torchtitan_upipe.cp.documents.Documents`): each stage's
attention is then document-masked (:class:`~torchtitan_upipe.cp.documents.DocumentKernel`);
without a ring only.

Saved for backward: ``x``, the three weights (four with ``wo``), ``freqs_cis``, the output
``out`` and the per-stage LSE.  No Q, K or V, and with ``wo`` no full-width output gradient:
the backward takes the projected output's ``(B, S/C, dim)`` gradient.  So the backward needs
nothing a forward computes but ``out`` and ``lse``: with a kept result
(``upipe_attention(keep=...)``, :mod:`~torchtitan_upipe.cp.replay`) the recompute under
activation checkpointing replays them (:class:`_ReplayAttention`) and runs no stage; the
backward is the same op.

``upipe_attention(..., inline=True)`` runs the same forward and backward without the
custom-op boundary (:class:`_InlineAttention`): under ``FakeTensorMode`` a custom op runs only
its shape function, which would hide the stages' buffers from the CPU memory estimator.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from ..comm import ProcessGroup, group_size
from ..documents import DocumentKernel, Documents
from ..kernels import AttentionKernel, get_kernel, resolve_kernel_and_scale
from ..precision import accumulation_dtype
from ..replay import AttentionSlot, Mode
from ..ring import RingKernel
from .functional import upipe_backward, upipe_forward
from .schedule import UPipeSchedule


def _group(name: str) -> ProcessGroup | None:
    if not name:
        return None
    return dist.distributed_c10d._resolve_process_group(name)


@functools.lru_cache(maxsize=None)
def _base_kernel(name: str, device_type: str) -> AttentionKernel:
    return get_kernel(name, torch.device(device_type))


def _run(fn, tensors, x, cu_seqlens, heads, group_name, ring_group_name, causal, scale, kernel):
    """``fn`` (:func:`upipe_forward` or :func:`upipe_backward`) on ``tensors`` with the ops'
    non-tensor arguments turned into a schedule, process groups and a kernel (document-masked
    when ``cu_seqlens`` is given; ``x`` is the op's input, for the batch and length)."""
    group, ring = _group(group_name), _group(ring_group_name)
    sched = UPipeSchedule(heads[0], heads[1], group_size(group), heads[2])
    inner = _base_kernel(kernel, tensors[0].device.type)
    kern = inner if ring is None else RingKernel(ring, inner)
    if cu_seqlens is not None:
        if ring is not None:
            raise ValueError("UPipe x ring does not take packed documents (a ring rank holds a "
                             "piece of the sequence)")
        kern = DocumentKernel(kern, Documents(cu_seqlens, x.shape[0], x.shape[1] * sched.degree))
    return fn(*tensors, sched, group, kern, causal, scale)


# The non-tensor arguments both ops take, declared once.
_STATIC = "int[] heads, str group_name, str ring_group_name, bool causal, float scale, str kernel"
torch.library.define(
    "upipe::attention_forward",
    f"(Tensor x, Tensor wq, Tensor wk, Tensor wv, Tensor freqs_cis, Tensor? cu_seqlens, "
    f"{_STATIC}) -> (Tensor, Tensor)",
)
torch.library.define(
    "upipe::projected_attention_forward",
    f"(Tensor x, Tensor wq, Tensor wk, Tensor wv, Tensor wo, Tensor freqs_cis, Tensor? cu_seqlens, "
    f"{_STATIC}) -> (Tensor, Tensor, Tensor)",
)
# dwo is an empty tensor without wo (a schema returns no optional tensors)
torch.library.define(
    "upipe::attention_backward",
    f"(Tensor dout, Tensor x, Tensor wq, Tensor wk, Tensor wv, Tensor? wo, Tensor freqs_cis, "
    f"Tensor out, Tensor lse, Tensor? cu_seqlens, {_STATIC}) "
    f"-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
attention_forward = torch.ops.upipe.attention_forward.default
projected_attention_forward = torch.ops.upipe.projected_attention_forward.default
attention_backward = torch.ops.upipe.attention_backward.default


def _forward_impl(x, wq, wk, wv, freqs_cis, cu_seqlens, *static):
    return _run(upipe_forward, (x, wq, wk, wv, freqs_cis), x, cu_seqlens, *static)


def _projected_forward_impl(x, wq, wk, wv, wo, freqs_cis, cu_seqlens, *static):
    """``(y, out, lse)``: :func:`_forward_impl` and ``y = out @ wo^T``, TorchTitan's ``wo``."""
    out, lse = _forward_impl(x, wq, wk, wv, freqs_cis, cu_seqlens, *static)
    return torch.nn.functional.linear(out, wo), out, lse


def _backward_impl(dout, x, wq, wk, wv, wo, freqs_cis, out, lse, cu_seqlens, *static):
    def backward(*args):
        dx, dwq, dwk, dwv, dwo = upipe_backward(*args, wo=wo)
        return dx, dwq, dwk, dwv, x.new_empty(0) if dwo is None else dwo

    return _run(backward, (dout.contiguous(), x, wq, wk, wv, freqs_cis, out, lse), x,
                cu_seqlens, *static)


torch.library.impl("upipe::attention_forward", "CompositeExplicitAutograd", _forward_impl)
torch.library.impl("upipe::projected_attention_forward", "CompositeExplicitAutograd",
                   _projected_forward_impl)
torch.library.impl("upipe::attention_backward", "CompositeExplicitAutograd", _backward_impl)


def _fake_lse(x, heads, group_name):
    b, s, _ = x.shape
    sched = UPipeSchedule(heads[0], heads[1], group_size(_group(group_name)), heads[2])
    return x.new_empty(sched.n_stages, b, sched.heads_per_rank, s * sched.degree,
                       dtype=accumulation_dtype(x.dtype))


@torch.library.register_fake("upipe::attention_forward")
def _(x, wq, wk, wv, freqs_cis, cu_seqlens, heads, group_name, *_):
    return x.new_empty(*x.shape[:2], wq.shape[0]), _fake_lse(x, heads, group_name)


@torch.library.register_fake("upipe::projected_attention_forward")
def _(x, wq, wk, wv, wo, freqs_cis, cu_seqlens, heads, group_name, *_):
    out = x.new_empty(*x.shape[:2], wq.shape[0])
    return x.new_empty(*x.shape[:2], wo.shape[0]), out, _fake_lse(x, heads, group_name)


@torch.library.register_fake("upipe::attention_backward")
def _(dout, x, wq, wk, wv, wo, *_):
    dwo = x.new_empty(0) if wo is None else torch.empty_like(wo)
    return (torch.empty_like(x), torch.empty_like(wq), torch.empty_like(wk),
            torch.empty_like(wv), dwo)


def _save(ctx, x, wq, wk, wv, wo, freqs_cis, out, lse, cu_seqlens, static):
    """What every backward of the op needs: no Q, K or V (module docstring).  The outputs
    without a gradient (``lse``; ``out`` next to the projected ``y``) get none: autograd would
    otherwise hand the backward zeros of their size (with ``wo``, a tensor as large as
    ``out``, where the layer peaks)."""
    ctx.save_for_backward(x, wq, wk, wv, wo, freqs_cis, out, lse)
    ctx.cu_seqlens, ctx.static = cu_seqlens, static  # a CPU tensor that autograd need not save
    ctx.set_materialize_grads(False)


def _setup_context(ctx, inputs, output):
    x, wq, wk, wv, freqs_cis, cu_seqlens, *static = inputs
    out, lse = output
    _save(ctx, x, wq, wk, wv, None, freqs_cis, out, lse, cu_seqlens, static)
    ctx.mark_non_differentiable(lse)


def _projected_setup_context(ctx, inputs, output):
    x, wq, wk, wv, wo, freqs_cis, cu_seqlens, *static = inputs
    _, out, lse = output
    _save(ctx, x, wq, wk, wv, wo, freqs_cis, out, lse, cu_seqlens, static)
    ctx.mark_non_differentiable(out, lse)


def _grads(ctx, dout, backward_fn):
    """``dx, dwq, dwk, dwv, dwo`` (``dwo`` ``None`` without ``wo``) from what :func:`_save`
    saved, by ``backward_fn`` (the backward op, or its implementation for the inline and
    replayed forms)."""
    x, wq, wk, wv, wo, *rest = ctx.saved_tensors
    if dout is None:  # the result was not used (:func:`_save`: no zeros materialized)
        return None, None, None, None, None
    dx, dwq, dwk, dwv, dwo = backward_fn(dout, x, wq, wk, wv, wo, *rest, ctx.cu_seqlens,
                                         *ctx.static)
    return dx, dwq, dwk, dwv, None if wo is None else dwo


def _backward(ctx, dout, _dlse):
    return _grads(ctx, dout, attention_backward)[:4] + (None,) * (2 + len(ctx.static))


def _projected_backward(ctx, dy, _dout, _dlse):
    return _grads(ctx, dy, attention_backward) + (None,) * (2 + len(ctx.static))


torch.library.register_autograd("upipe::attention_forward", _backward, setup_context=_setup_context)
torch.library.register_autograd("upipe::projected_attention_forward", _projected_backward,
                                setup_context=_projected_setup_context)


class _InlineAttention(torch.autograd.Function):
    """The op's forward and backward without the custom-op boundary, so each aten op of the
    stages is dispatched on its own (same values and gradients; not traceable by
    ``torch.compile``).  Returns what the ops return: ``(out, lse)``, or ``(y, out, lse)``
    with ``wo``."""

    @staticmethod
    def forward(ctx, x, wq, wk, wv, wo, freqs_cis, cu_seqlens, *static):
        out, lse = _forward_impl(x, wq, wk, wv, freqs_cis, cu_seqlens, *static)
        _save(ctx, x, wq, wk, wv, wo, freqs_cis, out, lse, cu_seqlens, static)
        if wo is None:
            ctx.mark_non_differentiable(lse)
            return out, lse
        ctx.mark_non_differentiable(out, lse)
        return torch.nn.functional.linear(out, wo), out, lse

    @staticmethod
    def backward(ctx, dout, *_):
        return _grads(ctx, dout, _backward_impl) + (None,) * (2 + len(ctx.static))


class _ReplayAttention(torch.autograd.Function):
    """The op's result kept from an earlier forward (``out``, ``lse``), returned without
    running any stage (``out``, or ``y = out @ wo^T`` with ``wo``, as the op computes it),
    with the op's backward: saves what :func:`_save` saves."""

    @staticmethod
    def forward(ctx, x, wq, wk, wv, wo, freqs_cis, out, lse, cu_seqlens, inline, *static):
        _save(ctx, x, wq, wk, wv, wo, freqs_cis, out, lse, cu_seqlens, static)
        ctx.inline = inline
        return out.view_as(out) if wo is None else torch.nn.functional.linear(out, wo)

    @staticmethod
    def backward(ctx, dout):
        grads = _grads(ctx, dout, _backward_impl if ctx.inline else attention_backward)
        return grads + (None,) * (5 + len(ctx.static))


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
    inline: bool = False,
    documents: Documents | None = None,
    keep: AttentionSlot | None = None,
    wo: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused projection + RoPE + UPipe context-parallel attention (+ the output projection).

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
        ring_group: for the UPipe x ring hybrid, the ring ranks; ``x`` is then this rank's
            piece of its ring rank's zigzag shard
            (:class:`~torchtitan_upipe.titan.sharding.UlyssesRingSharder`).  ``None`` = no ring.
        causal: causal mask over global positions.
        scale: softmax scale, default ``D ** -0.5``.
        kernel: ``[context_parallel] kernel`` name.
        inline: run without the custom-op boundary (see the module docstring).
        documents: the batch's packed documents over the whole sequence (causal attention
            inside each; no ring group).  ``None``: causal attention over the whole sequence.
        keep: this layer's kept attention result (:mod:`~torchtitan_upipe.cp.replay`): the
            op's ``(out, lse)`` are kept while the slot records; while it replays they are
            returned without running any stage, with the op's backward.
        wo: ``(dim, n_heads*D)``, TorchTitan's output projection weight, unsharded: the op
            returns ``out @ wo^T`` and its backward makes the full-width output gradient one
            stage's heads at a time (:mod:`.functional`).  ``None``: no projection.

    Returns:
        ``(B, S/C, n_heads*D)`` in canonical head order (input of ``wo``), or with ``wo``
        ``(B, S/C, dim)`` (its output).
    """
    sched = UPipeSchedule.resolve(n_heads, n_kv_heads, group_size(group), chunk_heads)
    head_dim = wq.shape[0] // n_heads
    if wq.shape[0] != n_heads * head_dim or wk.shape[0] != n_kv_heads * head_dim or wk.shape != wv.shape:
        raise ValueError(
            f"weights do not match n_heads={n_heads}, n_kv_heads={n_kv_heads}: "
            f"wq{tuple(wq.shape)} wk{tuple(wk.shape)} wv{tuple(wv.shape)}"
        )
    if wo is not None and wo.shape != (x.shape[-1], wq.shape[0]):
        raise ValueError(f"wo{tuple(wo.shape)} must be (dim, n_heads*D) = "
                         f"{(x.shape[-1], wq.shape[0])}")
    if freqs_cis.shape != (x.shape[1], head_dim // 2):
        raise ValueError(
            f"freqs_cis must be this rank's RoPE rows (S/C, D/2) = {(x.shape[1], head_dim // 2)}, "
            f"got {tuple(freqs_cis.shape)}"
        )
    _, scale = resolve_kernel_and_scale(kernel, x.device, head_dim, scale)  # fails early
    names = ("" if g is None else g.group_name for g in (group, ring_group))
    cu_seqlens = None
    if documents is not None:
        if ring_group is not None or not causal:
            raise ValueError("packed documents take causal UPipe without a ring group")
        if (documents.batch, documents.seq_len) != (x.shape[0], x.shape[1] * sched.degree):
            raise ValueError(f"{documents!r} do not describe this batch of {x.shape[0]} rows of "
                             f"{x.shape[1] * sched.degree} tokens")
        cu_seqlens = documents.cu_seqlens
    static = ([n_heads, n_kv_heads, sched.chunk_heads], *names, causal, scale, kernel)
    if keep is not None and keep.mode is Mode.REPLAY:
        out, lse = keep.take()
        return _ReplayAttention.apply(x, wq, wk, wv, wo, freqs_cis, out, lse, cu_seqlens, inline,
                                      *static)
    if inline:
        outputs = _InlineAttention.apply(x, wq, wk, wv, wo, freqs_cis, cu_seqlens, *static)
    elif wo is None:
        outputs = attention_forward(x, wq, wk, wv, freqs_cis, cu_seqlens, *static)
    else:
        outputs = projected_attention_forward(x, wq, wk, wv, wo, freqs_cis, cu_seqlens, *static)
    out, lse = outputs[-2:]  # (out, lse) or (y, out, lse)
    if keep is not None and keep.mode is Mode.RECORD:
        keep.keep(out, lse)
    return outputs[0]
