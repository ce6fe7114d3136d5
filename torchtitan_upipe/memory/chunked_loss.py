"""Chunked (sequence-tiled) output projection + cross entropy that never builds full logits.

TorchTitan computes ``pred = output(h)`` (a bias-free ``nn.Linear``: logits in the model
dtype, shape (B, S, vocab)) and then ``components.loss.cross_entropy_loss``::

    F.cross_entropy(pred.flatten(0, 1).float(), labels.flatten(0, 1),
                    reduction="sum", ignore_index=-100)

At S = 10^6 tokens and a 128k vocabulary those logits alone are 256 GB in bf16 (and twice
that for the float32 copy and again for its gradient).  :func:`chunked_cross_entropy`
computes the same SUM-reduced loss over ``num_chunks`` sequence chunks:

* forward, per chunk ``c``: ``z_c = (h_c W^T).to(f)`` (the model-dtype matmul, then the
  cast to the loss dtype ``f``, float32 for bf16/fp16/fp32), ``lse_c = logsumexp(z_c)``
  and ``loss += sum over non-ignored tokens of (lse_c - z_c[label])``.  Only ``h``,
  ``W``, ``labels`` and ``lse`` (one float per token) are saved.
* backward, per chunk: recompute ``z_c``, form ``p = exp(z_c - lse_c)``, subtract the
  one-hot of the labels, zero the ignored rows and scale by the incoming grad; cast to the
  model dtype (the backward of ``.float()``), then ``dh_c = p W`` and ``dW += p^T h_c``.

Memory bound (T = B*S tokens, V = vocab, n chunks): forward and backward each hold
O(T/n * V) transient logits (model dtype + loss dtype + gradient; about three chunk-sized
tensors in backward) plus T floats of ``lse``; backward additionally holds the (T, dim)
``dh`` and one (V, dim) ``dW`` accumulator (float32 when ``W`` is bf16/fp16, cast to
``W``'s dtype at the end).  The full (B, S, V) logits never exist.  Cost: the output
projection is computed twice (forward and backward recompute), i.e. +1 vocab matmul.

Dtype note: for bf16/fp16/fp32 inputs the semantics are TorchTitan's exactly (loss in
float32).  For float64 inputs the loss is computed in float64 (TorchTitan's ``.float()``
would downcast to float32); pass ``loss_dtype=torch.float32`` to force that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torch.autograd.function import once_differentiable

from ..cp.precision import accumulation_dtype
from ._common import add_mm_, autocast_dtype, clamp_tiles, split

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "chunked_cross_entropy",
    "chunked_cross_entropy_forward",
    "chunked_cross_entropy_backward",
]


def _chunk_logits(h2: torch.Tensor, w: torch.Tensor, loss_dtype: torch.dtype) -> torch.Tensor:
    z = F.linear(h2, w)
    return z if z.dtype == loss_dtype else z.to(loss_dtype)


def chunked_cross_entropy_forward(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor,
                                  num_chunks: int, ignore_index: int = IGNORE_INDEX,
                                  loss_dtype: torch.dtype | None = None
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(loss, lse)``: the summed loss (0-dim, ``loss_dtype``) and the (B, S)
    log-sum-exp of every token's logits (needed by the backward)."""
    if h.dim() != 3 or labels.shape != h.shape[:2]:
        raise ValueError(
            f"expected h (B, S, dim) and labels (B, S), got {tuple(h.shape)} and "
            f"{tuple(labels.shape)}"
        )
    ld = loss_dtype or accumulation_dtype(h.dtype)
    b, s, dim = h.shape
    n = clamp_tiles(num_chunks, s)
    lse = torch.empty((b, s), dtype=ld, device=h.device)
    loss = torch.zeros((), dtype=ld, device=h.device)
    for hc, lc, lsec in zip(split(h, n, 1), split(labels, n, 1), split(lse, n, 1)):
        z = _chunk_logits(hc.reshape(-1, dim), w, ld)
        lab = lc.reshape(-1).long()
        row_lse = torch.logsumexp(z, dim=-1)
        lsec.copy_(row_lse.view(lsec.shape))
        valid = lab != ignore_index
        safe = torch.where(valid, lab, torch.zeros_like(lab))
        tgt = z.gather(1, safe.unsqueeze(1)).squeeze(1)
        del z
        loss.add_(torch.where(valid, row_lse - tgt, torch.zeros_like(tgt)).sum())
        del row_lse, tgt
    return loss, lse


def chunked_cross_entropy_backward(
    grad_loss: torch.Tensor,
    h: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    num_chunks: int,
    ignore_index: int = IGNORE_INDEX,
    needs_grad: tuple[bool, bool] = (True, True),
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(dh, dW)`` of the summed loss, recomputing each chunk's logits."""
    need_h, need_w = needs_grad
    ld = lse.dtype
    b, s, dim = h.shape
    n = clamp_tiles(num_chunks, s)
    dh = torch.empty_like(h) if need_h else None
    dw = torch.zeros(w.shape, dtype=accumulation_dtype(w.dtype), device=w.device) if need_w else None
    gscale = grad_loss.to(ld)
    offset = 0
    for hc, lc, lsec in zip(split(h, n, 1), split(labels, n, 1), split(lse, n, 1)):
        sc = hc.shape[1]
        h2 = hc.reshape(-1, dim)
        lab = lc.reshape(-1).long()
        z = _chunk_logits(h2, w, ld)
        p = z.sub_(lsec.reshape(-1, 1)).exp_()
        valid = lab != ignore_index
        safe = torch.where(valid, lab, torch.zeros_like(lab))
        minus_one = torch.full((p.shape[0], 1), -1.0, dtype=ld, device=p.device)
        p.scatter_add_(1, safe.unsqueeze(1), minus_one)  # softmax - onehot
        p.mul_((valid.to(ld) * gscale).unsqueeze(1))
        g = p.to(h.dtype)  # backward of TorchTitan's ``.float()``
        del p, z
        if need_h:
            dh[:, offset : offset + sc].copy_(torch.mm(g, w).view(b, sc, dim))
        if need_w:
            add_mm_(dw, g.t(), h2)
        del g
        offset += sc
    if need_w:
        dw = dw.to(w.dtype)
    return dh, dw


class _ChunkedCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, labels, num_chunks, ignore_index, loss_dtype):
        loss, lse = chunked_cross_entropy_forward(
            h, w, labels, num_chunks, ignore_index, loss_dtype
        )
        ctx.num_chunks = num_chunks
        ctx.ignore_index = ignore_index
        ctx.save_for_backward(h, w, labels, lse)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        h, w, labels, lse = ctx.saved_tensors
        dh, dw = chunked_cross_entropy_backward(
            grad_loss, h, w, labels, lse, ctx.num_chunks, ctx.ignore_index,
            tuple(ctx.needs_input_grad[:2]),
        )
        return dh, dw, None, None, None, None


def chunked_cross_entropy(
    h: torch.Tensor,
    output_weight: torch.Tensor,
    labels: torch.Tensor,
    num_chunks: int,
    ignore_index: int = IGNORE_INDEX,
    loss_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Sum-reduced cross entropy of ``logits = h @ output_weight^T`` over sequence chunks.

    Equals TorchTitan's ``cross_entropy_loss(output(h), labels)`` for a bias-free
    ``nn.Linear`` ``output`` (ignored labels contribute nothing; an all-ignored input gives
    0), without materializing the (B, S, vocab) logits.

    Args:
        h: (B, S, dim) final hidden states (after the final norm).
        output_weight: (vocab, dim) ``nn.Linear`` weight.
        labels: (B, S) integer targets; ``ignore_index`` marks positions to skip.
        num_chunks: number of sequence chunks (``torch.tensor_split`` along dim 1; need not
            divide S; values above S are clamped).
        loss_dtype: dtype of the logits for the softmax and of the returned loss; default
            float32 for bf16/fp16/fp32 (TorchTitan's ``.float()``), float64 for float64.

    Under autocast, ``h`` and the weight are cast to the autocast dtype first (as autocast
    does for the output ``nn.Linear``).  See the module docstring for the memory bound.
    """
    ac = autocast_dtype(h)
    if ac is not None:
        h, output_weight = (
            t.to(ac) if t.dtype != torch.float64 else t for t in (h, output_weight)
        )
        with torch.autocast(h.device.type, enabled=False):
            return _ChunkedCrossEntropyFunction.apply(
                h, output_weight, labels, num_chunks, ignore_index, loss_dtype
            )
    return _ChunkedCrossEntropyFunction.apply(
        h, output_weight, labels, num_chunks, ignore_index, loss_dtype
    )
