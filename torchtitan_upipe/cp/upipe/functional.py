"""UPipe forward and backward as pure functions (no autograd): the math of the fused op.

Sharding contract.  ``x`` is ``(B, s, dim)``, rank ``r``'s contiguous sequence shard
(``s = S/C``, tokens ``[r*s, (r+1)*s)``); ``wq (H*D, dim)``, ``wk/wv (H_kv*D, dim)`` are the
full canonical ``nn.Linear`` weights (identical on every rank, as FSDP2 presents them inside
forward and backward); ``freqs_cis`` is TorchTitan's complex RoPE table for this rank's
positions, ``(s, D/2)``.  The output is ``(B, s, H*D)`` in canonical head order, ready for
``wo``.  ``lse`` is ``(n_stages, B, m, S)`` (``m = U/C``): the per-stage log-sum-exp of this
rank's heads over the whole sequence, float32 (float64 for float64 inputs).

Forward, per KV chunk ``c`` and per stage of it (see :mod:`.schedule` for the head maps)::

    k, v  = rope(x @ Wk[chunk]^T), x @ Wv[chunk]^T     (B, s, C*kappa, D)   once per chunk
    kh,vh = all-to-all seq->head (one fused buffer)    (B, S, kappa, D)
    for each of the tau stages of the chunk:
        q  = rope(x @ Wq[stage]^T)                     (B, s, U, D)
        qh = all-to-all seq->head                      (B, S, m, D)
        oh, lse[stage] = kernel(qh, kh, vh, causal)
        out[:, :, stage heads] = all-to-all head->seq(oh)      (B, s, U, D)

Each stage's buffers are released before the next (Python references dropped, so the caching
allocator reuses the same blocks), so the transient memory is O(U) heads, not O(H).
Nothing here synchronizes with the host.

Backward recomputes instead of saving Q/K/V: per chunk it re-projects K/V, per stage it
re-projects Q, all-to-alls the saved output and incoming gradient of the stage (one fused
buffer) to head-sharded layout, runs the kernel backward with the saved LSE, sends dQ back,
accumulates dK/dV over the chunk's stages and sends them back once per chunk, undoes RoPE
(multiplication by the conjugate), accumulates ``dx`` and writes the weight-gradient row
blocks.  With replicated KV heads, the replicas' gradients are summed before the weights.

Precision and memory of the accumulators.  ``dx`` is accumulated in ``x``'s dtype: each
stage's GEMM accumulates in float32 and rounds once into ``dx`` (``H/U + 2*n_chunks`` roundings
per layer; with ``U = C`` about as many as Ulysses' autograd, which adds the Q, K and V input
gradients).  A float32 ``dx`` would cost ``2 * b*s*dim`` bytes more in bf16 training (10.7 GB
at 5M tokens on 8 ranks for Llama3-8B) exactly where the step peaks.  The dK/dV of a KV chunk
shared by ``tau > 1`` stages are summed in float32 (``O(U)`` heads).

The output projection fused (``wo``, TorchTitan's ``(dim, H*D)`` weight, unsharded).  The
forward returns ``y = out @ wo^T`` ``(B, s, dim)`` besides ``out`` (the same single GEMM as
``nn.Linear``, so ``y`` is bit for bit TorchTitan's).  The backward then takes ``dy``, the
gradient of ``y``, instead of the full-width ``dout = dy @ wo`` ``(B, s, H*D)``: each stage
makes its own columns ``do_stage = dy @ wo[:, stage heads]`` ``(B, s, U, D)`` (the same dot
products, split by columns: no extra FLOPs) and ``dwo = dy^T @ out`` is one GEMM after the
last stage, so the ``e*b*s*H*D`` bytes of ``dout`` never exist, exactly where a layer's
backward peaks.
"""

from __future__ import annotations

import torch

from ..comm import (
    ProcessGroup,
    group_size,
    head_to_seq,
    pair_head_to_seq,
    pair_seq_to_head,
    seq_to_head,
)
from ..gqa import repeat_kv_heads, sum_kv_heads
from ..kernels import AttentionKernel
from ..precision import accumulation_dtype
from .schedule import UPipeSchedule


def apply_rope(t: torch.Tensor, freqs_cis: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """TorchTitan's complex RoPE on ``t (B, s, h, D)`` with ``freqs_cis (s, D/2)``.

    Computed as TorchTitan does (float32 complex, cast back), or in float64 for float64 input.
    ``inverse`` multiplies by the conjugate: RoPE is unitary, so that is the gradient map.
    """
    ct = accumulation_dtype(t.dtype)
    tc = torch.view_as_complex(t.to(ct).reshape(*t.shape[:-1], -1, 2))
    f = freqs_cis.to(tc.dtype)
    if inverse:
        f = f.conj()
    return torch.view_as_real(tc * f[None, :, None, :]).flatten(3).to(t.dtype)


def _views(sched: UPipeSchedule, wq, head_dim):
    hv, g = sched.virtual_kv_heads, sched.group_size
    return wq.view(hv, g, head_dim, wq.shape[-1])


def _stage_rows(sched: UPipeSchedule, stage: int) -> tuple[slice, slice]:
    chunk = stage // sched.stages_per_chunk
    r = sched.kv_range(chunk)
    return slice(r.start, r.stop), sched.query_slot(stage)


def _kv_weights(w: torch.Tensor, sched: UPipeSchedule, chunk: int, head_dim: int) -> torch.Tensor:
    """Rows of ``wk``/``wv`` for the *real* KV heads behind ``chunk``'s virtual heads."""
    r = sched.kv_range(chunk)  # with rho > 1 this is the single chunk of all KV heads
    return w[r.start // sched.rho * head_dim : r.stop // sched.rho * head_dim]


def _project_kv(x, wk, wv, freqs_cis, sched, chunk, head_dim):
    """K (rotated) and V of ``chunk``'s virtual KV heads: ``(B, s, C*kappa, D)`` each."""
    b, s, _ = x.shape
    k = torch.nn.functional.linear(x, _kv_weights(wk, sched, chunk, head_dim))
    v = torch.nn.functional.linear(x, _kv_weights(wv, sched, chunk, head_dim))
    k = apply_rope(k.view(b, s, -1, head_dim), freqs_cis)
    v = v.view(b, s, -1, head_dim)
    # H_kv < C: one chunk holds all C virtual heads; replicate in the computation only
    k = repeat_kv_heads(k, sched.rho)
    v = repeat_kv_heads(v, sched.rho)
    return k, v


def upipe_forward(
    x: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    freqs_cis: torch.Tensor,
    sched: UPipeSchedule,
    group: ProcessGroup | None,
    kernel: AttentionKernel,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, s, dim = x.shape
    c = group_size(group)
    h = sched.n_heads
    d = wq.shape[0] // h
    seq = s * c
    out = x.new_empty(b, s, h, d)
    out_v = out.view(b, s, sched.virtual_kv_heads, sched.group_size, d)
    lse = torch.empty(sched.n_stages, b, sched.heads_per_rank, seq,
                      dtype=accumulation_dtype(x.dtype), device=x.device)
    wq_v = _views(sched, wq, d)
    tau = sched.stages_per_chunk
    for chunk in range(sched.n_chunks):
        k, v = _project_kv(x, wk, wv, freqs_cis, sched, chunk, d)
        kh, vh = pair_seq_to_head(k, v, group)
        del k, v
        for stage in range(chunk * tau, (chunk + 1) * tau):
            kv_sl, q_sl = _stage_rows(sched, stage)
            w_stage = wq_v[kv_sl, q_sl].reshape(-1, dim)
            q = apply_rope(torch.nn.functional.linear(x, w_stage).view(b, s, -1, d), freqs_cis)
            del w_stage
            qh = seq_to_head(q, group)
            del q
            oh, stage_lse = kernel.forward(qh, kh, vh, causal=causal, scale=scale)
            del qh
            lse[stage].copy_(stage_lse)
            del stage_lse
            o = head_to_seq(oh, group)
            del oh
            out_v[:, :, kv_sl, q_sl] = o.view(b, s, -1, q_sl.stop - q_sl.start, d)
            del o
        del kh, vh
    return out.view(b, s, h * d), lse


def upipe_backward(
    dout: torch.Tensor,
    x: torch.Tensor,
    wq: torch.Tensor,
    wk: torch.Tensor,
    wv: torch.Tensor,
    freqs_cis: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    sched: UPipeSchedule,
    group: ProcessGroup | None,
    kernel: AttentionKernel,
    causal: bool,
    scale: float,
    wo: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``dx, dwq, dwk, dwv, dwo``.  ``wo``: ``dout`` is the gradient of the fused projection's
    ``y`` ``(B, s, dim)`` (see the module docstring); ``None``: of ``out`` ``(B, s, H*D)``,
    and ``dwo`` is ``None``."""
    b, s, dim = x.shape
    h = sched.n_heads
    d = wq.shape[0] // h
    acc = accumulation_dtype(x.dtype)  # for dK/dV shared by several stages
    x_flat = x.reshape(b * s, dim)
    dx = torch.zeros(b * s, dim, dtype=x.dtype, device=x.device)
    dwq, dwk, dwv = torch.empty_like(wq), torch.empty_like(wk), torch.empty_like(wv)
    wq_v, dwq_v = _views(sched, wq, d), _views(sched, dwq, d)
    shape5 = (b, s, sched.virtual_kv_heads, sched.group_size, d)
    out_v = out.reshape(shape5)
    stage_dout = _stage_dout(dout, wo, sched, d) if wo is not None else dout.reshape(shape5)
    tau = sched.stages_per_chunk
    for chunk in range(sched.n_chunks):
        k, v = _project_kv(x, wk, wv, freqs_cis, sched, chunk, d)
        kh, vh = pair_seq_to_head(k, v, group)
        del k, v
        dkh = dvh = None
        for stage in range(chunk * tau, (chunk + 1) * tau):
            kv_sl, q_sl = _stage_rows(sched, stage)
            w_stage = wq_v[kv_sl, q_sl].reshape(-1, dim)
            q = apply_rope(torch.nn.functional.linear(x, w_stage).view(b, s, -1, d), freqs_cis)
            qh = seq_to_head(q, group)
            del q
            o_stage = out_v[:, :, kv_sl, q_sl].reshape(b, s, -1, d)
            do_stage = (stage_dout(kv_sl, q_sl) if wo is not None
                        else stage_dout[:, :, kv_sl, q_sl]).reshape(b, s, -1, d)
            oh, doh = pair_seq_to_head(o_stage, do_stage, group)
            del o_stage, do_stage
            dqh, dk_s, dv_s = kernel.backward(doh, qh, kh, vh, oh, lse[stage], causal=causal, scale=scale)
            del qh, oh, doh
            if dkh is None:  # first stage of the chunk (the only one when tau == 1)
                dkh, dvh = (dk_s, dv_s) if tau == 1 else (dk_s.to(acc), dv_s.to(acc))
            else:
                dkh += dk_s
                dvh += dv_s
            del dk_s, dv_s
            dq = apply_rope(head_to_seq(dqh, group), freqs_cis, inverse=True)
            del dqh
            dq_flat = dq.reshape(b * s, -1)
            dx.addmm_(dq_flat, w_stage)
            dwq_v[kv_sl, q_sl] = (dq_flat.t() @ x_flat).view(-1, q_sl.stop - q_sl.start, d, dim)
            del dq, dq_flat, w_stage
        del kh, vh
        dk, dv = pair_head_to_seq(dkh.to(x.dtype), dvh.to(x.dtype), group)
        del dkh, dvh
        # gradient of the replication: sum each real head's replicas
        dk = sum_kv_heads(dk, sched.rho)
        dv = sum_kv_heads(dv, sched.rho)
        dk = apply_rope(dk, freqs_cis, inverse=True)
        dk_flat, dv_flat = dk.reshape(b * s, -1), dv.reshape(b * s, -1)
        wk_c = _kv_weights(wk, sched, chunk, d)
        wv_c = _kv_weights(wv, sched, chunk, d)
        dx.addmm_(dk_flat, wk_c)
        dx.addmm_(dv_flat, wv_c)
        _kv_weights(dwk, sched, chunk, d).copy_(dk_flat.t() @ x_flat)
        _kv_weights(dwv, sched, chunk, d).copy_(dv_flat.t() @ x_flat)
        del dk, dv, dk_flat, dv_flat
    dwo = None if wo is None else dout.reshape(b * s, dim).t() @ out.reshape(b * s, h * d)
    return dx.view(b, s, dim), dwq, dwk, dwv, dwo


def _stage_dout(dy: torch.Tensor, wo: torch.Tensor, sched: UPipeSchedule, head_dim: int):
    """The fused projection's per-stage gradient: ``(kv_sl, q_sl) -> dy @ wo[:, stage heads]``
    ``(B, s, kappa', gamma', D)``, the stage's columns of ``dout = dy @ wo`` (canonical head
    order: ``wo``'s columns are ``(H_kv', g, D)``)."""
    b, s, dim = dy.shape
    dy_flat = dy.reshape(b * s, dim)
    wo_v = wo.view(dim, sched.virtual_kv_heads, sched.group_size, head_dim)

    def stage(kv_sl: slice, q_sl: slice) -> torch.Tensor:
        w = wo_v[:, kv_sl, q_sl].reshape(dim, -1)  # a copy when the stage's heads are strided
        return (dy_flat @ w).view(b, s, kv_sl.stop - kv_sl.start, q_sl.stop - q_sl.start, head_dim)

    return stage

