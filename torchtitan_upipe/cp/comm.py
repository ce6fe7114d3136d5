"""Sequence <-> head all-to-all for Ulysses-family attention.

Sharding contract.  With ``C`` ranks in ``group`` and rank ``r``:

* **sequence-sharded** ``(B, S/C, H, D)``: rank ``r`` holds tokens ``[r*S/C, (r+1)*S/C)`` of
  every head.
* **head-sharded** ``(B, S, H/C, D)``: rank ``r`` holds heads ``[r*H/C, (r+1)*H/C)`` of every
  token, in sequence order.

``seq_to_head`` sends head group ``j`` of the local tokens to rank ``j``; ``head_to_seq`` is its
exact inverse.  Both are one ``all_to_all_single`` on a contiguous buffer whose leading
dimension is the peer rank::

    seq_to_head:  (B, s, H, D) -> view (B, s, C, H/C, D) -> permute (C, B, s, H/C, D)
                  --a2a-->  (C_src, B, s, H/C, D) -> permute (B, C_src, s, H/C, D)
                  -> view (B, S, H/C, D)          # source rank == sequence block

The autograd wrappers are differentiable: the gradient of ``seq_to_head`` is ``head_to_seq``
of the incoming gradient and vice versa.  ``group=None`` or a group of size 1 is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup


def group_size(group: ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_to_all(buf: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    out = torch.empty_like(buf)
    dist.all_to_all_single(out, buf, group=group)
    return out


def seq_to_head(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """``(B, S/C, H, D)`` sequence-sharded -> ``(B, S, H/C, D)`` head-sharded (not autograd)."""
    c = group_size(group)
    if c == 1:
        return x
    b, s, h, d = x.shape
    if h % c != 0:
        raise ValueError(f"cannot scatter {h} heads over {c} ranks")
    buf = x.reshape(b, s, c, h // c, d).permute(2, 0, 1, 3, 4).contiguous()
    out = _all_to_all(buf, group)  # (C_src, B, s, H/C, D)
    return out.permute(1, 0, 2, 3, 4).reshape(b, c * s, h // c, d)


def head_to_seq(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """``(B, S, H/C, D)`` head-sharded -> ``(B, S/C, H, D)`` sequence-sharded (not autograd)."""
    c = group_size(group)
    if c == 1:
        return x
    b, seq, hc, d = x.shape
    if seq % c != 0:
        raise ValueError(f"cannot scatter a sequence of {seq} tokens over {c} ranks")
    s = seq // c
    buf = x.reshape(b, c, s, hc, d).permute(1, 0, 2, 3, 4).contiguous()
    out = _all_to_all(buf, group)  # (C_src, B, s, H/C, D), C_src == head group
    return out.permute(1, 2, 0, 3, 4).reshape(b, s, c * hc, d)


class _SeqToHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return seq_to_head(x, group)

    @staticmethod
    def backward(ctx, grad):
        return head_to_seq(grad, ctx.group), None


class _HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return head_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return seq_to_head(grad, ctx.group), None


def all_to_all_seq_to_head(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Differentiable :func:`seq_to_head`."""
    if group_size(group) == 1:
        return x
    return _SeqToHead.apply(x, group)


def all_to_all_head_to_seq(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Differentiable :func:`head_to_seq`."""
    if group_size(group) == 1:
        return x
    return _HeadToSeq.apply(x, group)
