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
:func:`pack_pair` fuses two tensors into one buffer, so that K and V (or O and dO, dK and dV)
move in one collective.
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


def _exchange(x: torch.Tensor, group: ProcessGroup | None, scatter: int, gather: int,
              what: str) -> torch.Tensor:
    """Cut dim ``scatter`` of ``x`` into ``C`` blocks, send block ``j`` to rank ``j``, and
    concatenate the blocks received along dim ``gather`` in source-rank order."""
    c = group_size(group)
    if c == 1:
        return x
    n = x.shape[scatter]
    if n % c != 0:
        raise ValueError(f"cannot scatter {n} {what} over {c} ranks")
    shape = (*x.shape[:scatter], c, n // c, *x.shape[scatter + 1:])
    buf = x.reshape(shape).movedim(scatter, 0).contiguous()  # the peer rank leads
    out = _all_to_all(buf, group)  # (C_src, ...)
    return out.movedim(0, gather).flatten(gather, gather + 1)


def seq_to_head(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """``(B, S/C, H, D)`` sequence-sharded -> ``(B, S, H/C, D)`` head-sharded (not autograd).

    ``view (B, s, C, H/C, D) -> (C, B, s, H/C, D) --a2a--> (C_src, B, s, H/C, D)
    -> (B, C_src, s, H/C, D) -> (B, S, H/C, D)``: the source rank is the sequence block."""
    return _exchange(x, group, scatter=2, gather=1, what="heads")


def head_to_seq(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """``(B, S, H/C, D)`` head-sharded -> ``(B, S/C, H, D)`` sequence-sharded (not autograd).

    ``view (B, C, s, H/C, D) -> (C, B, s, H/C, D) --a2a--> (C_src, B, s, H/C, D)
    -> (B, s, C_src, H/C, D) -> (B, s, H, D)``: the source rank is the head group."""
    return _exchange(x, group, scatter=1, gather=2, what="tokens")


class _AllToAll(torch.autograd.Function):
    """One layout change and, as its gradient, the inverse one."""

    @staticmethod
    def forward(ctx, x, group, to_head: bool):
        ctx.group, ctx.to_head = group, to_head
        return (seq_to_head if to_head else head_to_seq)(x, group)

    @staticmethod
    def backward(ctx, grad):
        return (head_to_seq if ctx.to_head else seq_to_head)(grad, ctx.group), None, None


def all_to_all_seq_to_head(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Differentiable :func:`seq_to_head`."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, group, True)


def all_to_all_head_to_seq(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Differentiable :func:`head_to_seq`."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, group, False)


# ------------------------------------------------------------------------- fused pairs
def pack_pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Two ``(B, s, h, D)`` tensors as one ``(B, s, 2h, D)`` buffer, heads interleaved
    (``a_0, b_0, a_1, b_1, ...``), so that head group ``r`` of the buffer holds exactly head
    group ``r`` of ``a`` and of ``b``: one all-to-all moves both (K and V, O and dO, dK and
    dV).  Differentiable."""
    bsz, s, h, d = a.shape
    return torch.stack((a, b), dim=3).reshape(bsz, s, 2 * h, d)


def unpack_pair(pair: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_pair` (views of ``pair``)."""
    heads = pair.unflatten(2, (-1, 2))
    return heads[:, :, :, 0], heads[:, :, :, 1]


def pair_seq_to_head(a, b, group: ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`seq_to_head` of two equally shaped tensors in one collective (not autograd)."""
    return unpack_pair(seq_to_head(pack_pair(a, b), group))


def pair_head_to_seq(a, b, group: ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`head_to_seq` of two equally shaped tensors in one collective (not autograd)."""
    return unpack_pair(head_to_seq(pack_pair(a, b), group))
