"""Ring attention with zigzag causal load balancing, on the kernel layer.

The ring dimension of the hybrid (Ulysses x ring) context-parallel styles.  With ``R`` ranks
in ``group``, ring rank ``r`` holds the zigzag shard of the ring's sequence (chunks ``r`` and
``2R-1-r`` of ``2R``, see :mod:`.zigzag`) of q, k and v.  K/V (with their own ``H_kv`` heads,
never expanded) travel around the ring; each rank attends its queries to every block and
merges the partial results with their log-sum-exps::

    step i: kv block of src = (r - i) mod R        (send current kv to r+1, receive from r-1,
                                                    overlapped with the block's compute)
      i == 0          own kv:   q x kv                causal on the local [c_r | c_{2R-1-r}]
      src < r         q (both chunks) x first chunk of src's kv          non-causal
      src > r         second chunk of q x all of src's kv                non-causal
      (causal=False:  q x kv, non-causal, every step)

    out, lse <- merge(out, lse, block_out, block_lse)   (fp32 running state, fp64 for fp64)

Every rank does the same work per step (one chunk x two chunks), which is the point of the
zigzag layout.  The backward walks the same schedule: K/V rotate again, the kernel backward
of each block uses the FINAL merged ``out``/``lse`` (restricted to the block's query rows),
``dq`` accumulates locally and the fp32 ``dK/dV`` accumulators travel with their K/V, so
after ``R`` hops every rank holds the gradient of its own K/V.

Point-to-point traffic per call: ``R-1`` sends of one fused K|V buffer forward; ``R-1`` K|V
plus ``R`` dK|dV sends backward.  Nothing synchronizes with the host except waiting on the
p2p works.  ``group=None`` or a group of size 1 is plain local attention.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .comm import ProcessGroup, group_rank, group_size
from .kernels import AttentionKernel, check_shapes, kernel_attention, resolve_kernel
from .precision import accumulation_dtype

__all__ = ["RingComm", "RingKernel", "merge", "ring_attention", "ring_backward", "ring_forward"]


# ----------------------------------------------------------------------------- communication
class RingComm:
    """Send to the next rank of ``group``, receive from the previous one, wait.

    Group-local neighbours are translated to global ranks (``dist.get_global_rank``), so the
    ring may be any sub-group.  One ``send_recv`` is in flight at a time per instance; a
    ``RingComm`` per stream of messages (K/V, dK/dV) keeps their waits independent, and all
    ranks post in the same order, so messages between a pair of ranks match FIFO.
    """

    def __init__(self, group: ProcessGroup):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.send_rank = dist.get_global_rank(group, (self.rank + 1) % self.world_size)
        self.recv_rank = dist.get_global_rank(group, (self.rank - 1) % self.world_size)
        self._works: list = []

    def send_recv(
        self, to_send: torch.Tensor, recv_buf: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Start sending ``to_send`` (contiguous) to the next rank and receiving into a buffer
        from the previous one; return the buffer (valid after :meth:`wait`)."""
        if self._works:
            raise RuntimeError("RingComm.send_recv called while a previous one is in flight")
        recv = torch.empty_like(to_send) if recv_buf is None else recv_buf
        ops = [
            dist.P2POp(dist.isend, to_send, self.send_rank, group=self.group),
            dist.P2POp(dist.irecv, recv, self.recv_rank, group=self.group),
        ]
        self._works = dist.batch_isend_irecv(ops)
        return recv

    def wait(self) -> None:
        for work in self._works:
            work.wait()
        self._works = []


# ------------------------------------------------------------------------------------ merge
def merge(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a block's attention into the running state, numerically stably.

    ``out``/``block_out`` ``(B, S, H, D)``, ``lse``/``block_lse`` ``(B, H, S)``; the result has
    the dtypes of ``out``/``lse``.  With ``w = sigmoid(block_lse - lse)`` (the block's share of
    the combined softmax mass)::

        out' = out - w * (out - block_out)
        lse' = lse - logsigmoid(lse - block_lse)        (= logaddexp(lse, block_lse))

    Rows with ``lse = -inf`` (no key seen yet) take the block as is; rows with
    ``block_lse = -inf`` (the block has no key for them) keep the state, whatever the
    kernel wrote in those rows of ``block_out``.
    """
    block_lse = block_lse.to(lse.dtype)
    block_out = block_out.to(out.dtype)
    neg_inf = float("-inf")
    new_lse = torch.where(lse == neg_inf, block_lse, lse - F.logsigmoid(lse - block_lse))
    l = lse.transpose(1, 2).unsqueeze(-1)  # (B, S, H, 1)
    bl = block_lse.transpose(1, 2).unsqueeze(-1)
    mixed = out - torch.sigmoid(bl - l) * (out - block_out)
    new_out = torch.where(bl == neg_inf, out, torch.where(l == neg_inf, block_out, mixed))
    return new_out, new_lse


def _stack_kv(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One contiguous ``(2, B, S, H_kv, D)`` buffer: a single message per ring step."""
    return torch.stack((k, v))


# ---------------------------------------------------------------------------------- forward
def ring_forward(group: ProcessGroup | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 kernel: AttentionKernel, causal: bool, scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring attention forward on zigzag shards: ``(out (B,S,H,D) in q.dtype, lse (B,H,S))``.

    ``lse`` is float32 (float64 for float64 inputs) over the whole ring's keys.
    """
    world, rank = group_size(group), group_rank(group)
    acc = accumulation_dtype(q.dtype)
    half = q.shape[1] // 2
    kv = _stack_kv(k, v)
    comm = RingComm(group) if world > 1 else None
    spare = None  # the buffer sent last step, free again after its wait: next receive buffer
    out = lse = None
    for step in range(world):
        if step + 1 < world:
            next_kv = comm.send_recv(kv, spare)
        src = (rank - step) % world
        if step == 0:
            block_out, block_lse = kernel.forward(q, kv[0], kv[1], causal=causal, scale=scale)
            out, lse = block_out.to(acc), block_lse.to(acc)
        elif not causal or src < rank:
            kk, vv = (kv[0], kv[1]) if not causal else (kv[0, :, :half], kv[1, :, :half])
            block_out, block_lse = kernel.forward(q, kk, vv, causal=False, scale=scale)
            out, lse = merge(out, lse, block_out, block_lse)
        else:  # causal, src > rank: only the late chunk of q sees src's tokens (all of them)
            block_out, block_lse = kernel.forward(
                q[:, half:], kv[0], kv[1], causal=False, scale=scale
            )
            o1, l1 = merge(out[:, half:], lse[:, :, half:], block_out, block_lse)
            out = torch.cat((out[:, :half], o1), dim=1)
            lse = torch.cat((lse[:, :, :half], l1), dim=2)
            del o1, l1
        # merged: free the block's output before the next block's kernel call
        del block_out, block_lse
        if step + 1 < world:
            comm.wait()
            kv, spare = next_kv, kv
    return out.to(q.dtype), lse.contiguous()


# --------------------------------------------------------------------------------- backward
def ring_backward(group: ProcessGroup | None, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, kernel: AttentionKernel,
                  causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`ring_forward` given its final ``out`` and ``lse``: ``(dq, dk, dv)``.

    Step ``i`` handles the K/V block of ``src = (rank - i) mod R`` with the forward's
    schedule.  The dK|dV accumulator of that block arrives from the previous rank (which
    handled it one step earlier), gets this rank's contribution and moves on; ``R`` hops bring
    every accumulator home.
    """
    world, rank = group_size(group), group_rank(group)
    acc = accumulation_dtype(q.dtype)
    half = q.shape[1] // 2
    kv = _stack_kv(k, v)
    if causal and world > 1:
        q1, dout1, out1, lse1 = q[:, half:], dout[:, half:], out[:, half:], lse[:, :, half:]
    kv_comm = RingComm(group) if world > 1 else None
    d_comm = RingComm(group) if world > 1 else None
    kv_spare = dkv_spare = None
    dq = dkv = next_dkv = None
    for step in range(world):
        if step + 1 < world:
            next_kv = kv_comm.send_recv(kv, kv_spare)
        src = (rank - step) % world
        if step == 0:
            bdq, bdk, bdv = kernel.backward(
                dout, q, kv[0], kv[1], out, lse, causal=causal, scale=scale
            )
            dq = bdq.to(acc)
            dkv = torch.empty(kv.shape, dtype=acc, device=kv.device)
            dkv[0].copy_(bdk)
            dkv[1].copy_(bdv)
        else:
            if not causal:
                bdq, bdk, bdv = kernel.backward(
                    dout, q, kv[0], kv[1], out, lse, causal=False, scale=scale
                )
                dq += bdq
            elif src < rank:
                bdq, bdk, bdv = kernel.backward(
                    dout, q, kv[0, :, :half], kv[1, :, :half], out, lse, causal=False, scale=scale
                )
                dq += bdq
            else:
                bdq, bdk, bdv = kernel.backward(
                    dout1, q1, kv[0], kv[1], out1, lse1, causal=False, scale=scale
                )
                dq[:, half:] += bdq
            d_comm.wait()  # the accumulator of the block we hold now, and the last send done
            dkv, dkv_spare = next_dkv, dkv
            n = half if causal and src < rank else kv.shape[2]
            dkv[0, :, :n] += bdk
            dkv[1, :, :n] += bdv
        # accumulated: free the block's gradients before the next block's kernel call
        del bdq, bdk, bdv
        if step + 1 < world:
            kv_comm.wait()
            kv, kv_spare = next_kv, kv
        if world > 1:
            next_dkv = d_comm.send_recv(dkv, dkv_spare)
    if world > 1:
        d_comm.wait()
        dkv = next_dkv
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


# ------------------------------------------------------------------------------ entry point
def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                   group: ProcessGroup | None, causal: bool = True, scale: float | None = None,
                   kernel: str | AttentionKernel = "auto") -> torch.Tensor:
    """Attention of this ring rank's zigzag shard against the whole ring's sequence.

    Args:
        q: ``(B, S_local, H, D)``: chunks ``r`` and ``2R-1-r`` of the ring's sequence
            (:func:`~.zigzag.zigzag_shard`), in that order.
        k, v: ``(B, S_local, H_kv, D)``, the same tokens; ``H % H_kv == 0``.
        group: the ``R`` ring ranks, ordered by ring rank; ``None`` or size 1 = no ring.
        causal: causal mask over the ring's global positions (needs even ``S_local`` when
            ``R > 1``).  Without it the layout does not matter (any sharding works).
        scale, kernel: as for :func:`~.ulysses.ulysses_attention` (``D ** -0.5``; a
            ``[context_parallel] kernel`` name or an :class:`AttentionKernel`).

    Returns:
        ``(B, S_local, H, D)`` in ``q.dtype``, for the same tokens as ``q``.
    """
    check_shapes(q, k, v)  # the kernel layout contract (BSHD, GQA head ratio)
    if k.shape[1] != q.shape[1]:
        raise ValueError(
            f"ring_attention needs q, k, v for the same tokens: q{tuple(q.shape)} "
            f"k{tuple(k.shape)} v{tuple(v.shape)}"
        )
    if causal and group_size(group) > 1 and q.shape[1] % 2 != 0:
        raise ValueError(
            f"causal ring attention takes zigzag shards (two equal chunks), so the local "
            f"sequence length must be even, got {q.shape[1]}"
        )
    ring = RingKernel(group, resolve_kernel(kernel, q.device))
    return kernel_attention(q, k, v, kernel=ring, causal=causal, scale=scale)


# ------------------------------------------------------------------------- kernel adapter
class RingKernel(AttentionKernel):
    """Ring attention over ``group`` presented as an :class:`AttentionKernel`.

    This is how the hybrids compose: Ulysses and UPipe call their kernel on head-sharded
    tensors holding the ring rank's zigzag shard of the sequence; with a ``RingKernel`` that
    call becomes a ring pass over the other ring ranks' K/V (``inner`` computes each block).
    :func:`ring_attention` is :func:`~.kernels.kernel_attention` through it.  Same layout
    contract as every kernel; ``lse`` covers the whole ring's keys.
    """

    name = "ring"

    def __init__(self, group: ProcessGroup | None, inner: AttentionKernel) -> None:
        self.group, self.inner = group, inner

    def forward(self, q, k, v, *, causal, scale):
        return ring_forward(self.group, q, k, v, self.inner, causal, scale)

    def backward(self, dout, q, k, v, out, lse, *, causal, scale):
        return ring_backward(self.group, dout, q, k, v, out, lse, self.inner, causal, scale)

    def __repr__(self) -> str:
        return f"RingKernel(degree={group_size(self.group)}, inner={self.inner!r})"
