"""Analytic per-rank memory model of one training step (derived from the code, not measured).

Symbols (per rank): ``T = b*S/C`` local tokens (``s = S/C``), ``e``/``p`` activation/param
bytes, ``H``, ``H_kv``, ``D`` heads, KV heads, head dim, ``F`` MLP hidden, ``V`` vocab, ``L``
layers, ``u`` all-to-all degree, ``R = C/u`` ring degree, ``U`` UPipe query heads per stage,
``rho`` KV replication.  Every size comes from the job's :class:`~.shape.JobShape`
(UPipe's geometry from its :class:`~..cp.upipe.schedule.UPipeSchedule`), never re-derived
here.  Each term names the code it models as ``function: tensor`` (``upipe_forward: lse``);
"TorchTitan's" means ``torchtitan/models/llama3/model/model.py``.  ``_rope(n)``: one RoPE
over ``n`` bf16 elements adds an fp32 copy, the fp32 product and the cast back, 10n.  The
model-vs-measurement tests (``tests/titan/test_memory_model.py``) and the
model-vs-estimator tests (``tests/tools/test_estimate.py``) guard every term.

Assumption: full activation checkpointing (TorchTitan's, or ``memory.offload``): between
forward and backward only block inputs live, and in backward one block at a time is recomputed
and backpropagated, so ``peak_device = model_states + rope_table + checkpointed_inputs_device
+ max(phases)``; the phases are the steps of one layer's recompute + backward (each holding what
autograd kept from the earlier steps) and the loss.  The no-grad forward never exceeds them.
``cuda_workspaces`` adds what kernels allocate internally (FA2 backward: fp32 dq_accum,
softmax_d, GQA-expanded dK/dV; logsumexp's ``z - max``), invisible to the CPU tracker.  Not
modelled: allocator fragmentation, NCCL buffers, the CUDA context, int64 token/label tensors.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..memory import auto_num_tiles
from .memory_stack import DEFAULT_CHUNK_TOKENS
from .shape import JobShape, ModelShape

GiB = 1 << 30


def _from_shape(path: str, doc: str) -> property:
    first, _, rest = path.partition(".")

    def get(st):
        value = getattr(st.shape, first)
        return getattr(value, rest) if rest else value

    return property(get, doc=doc)


@dataclass(frozen=True)
class Setup:
    """One rank of a job for the model: its :class:`~.shape.JobShape` and the options
    the memory depends on.  Build it with :func:`setup`, :func:`from_flavor`,
    :func:`from_model_args` or :func:`from_job_config` (from train.py's options)."""

    shape: JobShape
    param_bytes: int = 2         # bf16 compute params / unsharded grads
    reduce_bytes: int = 4        # FSDP's reduce-scatter dtype (mixed_precision_reduce)
    act_bytes: int = 2
    offload: bool = False        # memory.offload_activations
    keep_layers: int = 1         # memory.offload_keep_layers
    offload_stride: int = 1      # memory.offload_stride (offload._Segment)
    offload_prefetch: bool = True  # memory.offload_prefetch (HostOffloader.prefetch)
    refetch_input: bool = False    # memory.offload_refetch_input (offload._refetching)
    inplace_grads: bool = False    # memory.offload_inplace_residual_grads (offload._GradInto)
    fused_wo: bool = False         # memory.fuse_output_projection (UPipe's op applies wo)
    keep_attention: str = "none"   # memory.keep_attention_output: "none" | "device" | "host"
    offload_optimizer: bool = False  # memory.offload_optimizer_state (OptimizerStateOffloader)
    tiled_mlp: bool = False
    mlp_tiles: int = 0           # 0 = memory.auto_num_tiles(s, dim), as titan's apply_tiling
    tiled_norm: bool = False
    norm_tiles: int = 0
    chunked_loss: bool = False
    loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS  # ChunkedLossOutput's chunks ...
    loss_chunks: int = 0         # ... or memory.loss_chunks of them
    fused_rms_norm: bool = True    # CUDA aten._fused_rms_norm; False = the composite (CPU) path
    local_rope: bool = True        # RoPE table = this rank's S/C rows (titan.llama3's
    #                                Transformer.use_local_rope); False: all S rows
    cuda_workspaces: bool = True

    dim = _from_shape("model.dim", "model width")
    n_layers = _from_shape("model.n_layers", "L")
    n_heads = _from_shape("model.n_heads", "H")
    n_kv_heads = _from_shape("model.n_kv_heads", "H_kv")
    head_dim = _from_shape("model.head_dim", "D")
    ffn_hidden = _from_shape("model.ffn_hidden", "F")
    vocab = _from_shape("model.vocab", "V")
    seq_len = _from_shape("seq_len", "S")
    batch = _from_shape("batch", "b")
    cp = _from_shape("cp", "C = u * R")
    world = _from_shape("world", "N: FSDP shards over the world")
    u = _from_shape("ulysses", "u")
    ring = _from_shape("ring", "R")
    s = _from_shape("local_seq", "s = S/C")
    tokens = _from_shape("local_tokens", "T = b s")


_SHAPE_OPTIONS = {"seq_len", "batch", "cp", "ulysses", "world", "style", "chunk_heads"}


def setup(model: ModelShape, seq_len: int, *, style: str = "upipe", cp: int = 1, ulysses: int = 0,
          chunk_heads: int = 0, batch: int = 1, world: int = 1, **options) -> Setup:
    """A :class:`Setup` of ``model`` on the CP layout the options describe (``ulysses``:
    ``context_parallel.ulysses_degree``, ``chunk_heads``: ``upipe_chunk_heads``, 0 = their
    defaults) and the other :class:`Setup` fields in ``options``."""
    shape = JobShape.build(model, seq_len, style, cp, ulysses, chunk_heads, batch, world)
    return Setup(shape, **options)


def from_flavor(flavor: str, **kw) -> Setup:
    """:func:`setup` for a flavor of :data:`~.llama3.FLAVORS`."""
    return setup(ModelShape.from_flavor(flavor), **kw)


def from_model_args(a, **kw) -> Setup:
    """:func:`setup` for TorchTitan Llama3 model args ``a`` (``TransformerModelArgs`` or ours)."""
    return setup(ModelShape.from_args(a), **kw)


_JOB_FIELDS = {f.name for f in dataclasses.fields(JobShape)} - {"model"}


def replace(st: Setup, **changes) -> Setup:
    """``st`` with some options changed: :class:`Setup` fields, :class:`JobShape` fields
    (``seq_len``, ``chunk_heads``, ...) and ``n_layers`` (the model's depth)."""
    shape = st.shape
    if "n_layers" in changes:
        shape = shape.with_layers(changes.pop("n_layers"))
    job = {k: changes.pop(k) for k in list(changes) if k in _JOB_FIELDS}
    if job:
        shape = dataclasses.replace(shape, **job)
    return dataclasses.replace(st, shape=shape, **changes)


def _rope(n, e):
    return n * (4 + (4 + e if e < 4 else 0))


def _rope_inv(n, e, conj):
    """Inverse RoPE (``apply_rope(..., inverse=True)``): the multiply materializes
    conj(freqs) first (``conj`` bytes, freed before the cast back)."""
    return _rope(n, e) + max(0, conj - (e * n if e < 4 else 0))


def _tile(length, tiles, b):
    """Tokens of the largest ``tensor_split`` tile along the sequence (``memory``'s ``split``)."""
    return b * math.ceil(length / max(1, min(tiles, length)))


def fa2_backward_workspace_bytes(nq: int, head_dim: int, gqa: bool, act_bytes: int) -> int:
    """What FlashAttention-2's backward (``mha_bwd``) allocates besides dq, dk, dv for a query
    of ``nq`` elements: fp32 ``dq_accum`` ``4 nq``, fp32 ``softmax_d`` ``4 nq / D`` and, when
    query heads share KV heads (GQA), dK/dV expanded to every query head ``2 e nq`` before
    they are summed per group.  (Tile rounding of the sequence and head dims is ignored.)"""
    return 4 * nq + 4 * nq // head_dim + (2 * act_bytes * nq if gqa else 0)


def _fa2_ws(st, nq, gqa):
    if not st.cuda_workspaces:
        return 0
    return fa2_backward_workspace_bytes(nq, st.head_dim, gqa, st.act_bytes)


def attention_workspace_bytes(st: Setup) -> int:
    """FA2 backward workspace of one attention kernel call of ``st``'s style: a UPipe stage
    (``U`` query heads, GQA when a stage's heads share KV heads) or all ``H`` local heads."""
    if st.shape.schedule is not None:
        gm = upipe_geometry(st)
        return _fa2_ws(st, gm["nq"], gm["gamma"] > 1)
    nq = st.tokens * st.n_heads * st.head_dim
    return _fa2_ws(st, nq, st.n_heads != st.n_kv_heads * st.shape.rho)


def _ring_fwd(st, nq, nkv):
    """``ring_forward`` (R > 1): its own K|V stack (``_stack_kv``) + the receive buffer
    (``RingComm.send_recv``), the fp32 ``out`` and ``merge``'s fp32 ``block_out``, ``mixed``
    and inner and outer ``where``: ``4 e nkv + 20 nq``."""
    return 0 if st.ring == 1 else 4 * nkv * st.act_bytes + 20 * nq


def _stage_kernel_bwd(st, nq, nkv, gqa):
    """A kernel backward's dq, dk, dv ``e (nq + 2 nkv)`` + FA2 workspace.  In a causal ring
    (R > 1) the steps after the first, where the fp32 accumulators exist, each take half a
    block: ``src < rank`` all queries against half the keys (half ``dk``/``dv``), ``src >
    rank`` half the queries (half ``dq`` and workspace); the worse of the two."""
    e = st.act_bytes
    if st.ring == 1:
        return e * (nq + 2 * nkv) + _fa2_ws(st, nq, gqa)
    return max(e * (nq + nkv) + _fa2_ws(st, nq, gqa),
               e * (nq // 2 + 2 * nkv) + _fa2_ws(st, nq // 2, gqa))


def _ring_bwd(st, nq, nkv):
    """``ring_backward``: the K|V stack + its receive buffer, the fp32 ``dq``, and two fp32
    dK|dV accumulators (``dkv`` and the one in flight, ``next_dkv``)."""
    return 0 if st.ring == 1 else 4 * nkv * st.act_bytes + 4 * nq + 16 * nkv


# ------------------------------------------------------------------------------ attention
def upipe_geometry(st: Setup) -> dict:
    """UPipe's sizes from the job's :class:`UPipeSchedule`: ``U``, ``rho``, ``gamma``,
    ``kappa``, ``tau`` (``stages_per_chunk``); ``nq = T U D`` (a stage's Q) and
    ``nkv = T u kappa D`` (a chunk's K, ``chunk_kv_heads = u kappa``).  A stage's wq rows are
    strided, so ``upipe_forward``/``upipe_backward``'s ``w_stage`` reshape copies, when
    ``tau > 1`` and ``u kappa > 1``; so are its ``o_stage``/``do_stage`` slices when also
    ``gamma > 1``."""
    sched = st.shape.schedule
    gamma, tau = sched.gamma, sched.stages_per_chunk
    strided = tau > 1 and sched.chunk_kv_heads > 1
    return {"U": sched.chunk_heads, "rho": sched.rho, "gamma": gamma, "kappa": sched.kappa,
            "tau": tau, "strided": strided, "o_copy": strided and gamma > 1,
            "nq": st.tokens * sched.chunk_heads * st.head_dim,
            "nkv": st.tokens * sched.chunk_kv_heads * st.head_dim}


def _upipe_kv(st):
    """K/V of a chunk (``_project_kv`` and the K|V ``pair_seq_to_head`` of ``upipe_forward``
    and ``upipe_backward``): k, v ``2 e nkv/rho`` + RoPE of k (+ the replicas,
    ``repeat_kv_heads``), or k, v and the packed pair ``4 e nkv`` (``pack_pair``) (+ the
    all-to-all's send buffer and receive ``4 e nkv``, ``seq_to_head``)."""
    e, gm = st.act_bytes, upipe_geometry(st)
    nkv, rho = gm["nkv"], gm["rho"]
    proj = 2 * e * nkv // rho + _rope(nkv // rho, e) + (2 * e * nkv if rho > 1 else 0)
    return max(proj, e * nkv * (8 if st.u > 1 else 4))


def upipe_forward_bytes(st: Setup) -> int:
    """Peak allocated by ``upipe_forward`` over its inputs.

    ``out`` ``e T H D`` + ``lse`` ``4 T H`` + max(the K/V steps (:func:`_upipe_kv`),
    ``kh``/``vh`` ``2 e nkv`` + a stage: max(the ``w_stage`` copy ``e U D dim`` (freed right
    after the projection) + the q projection and its RoPE ``e nq + _rope(nq)``; ``q``, the
    send buffer and ``qh`` ``3 e nq`` (``seq_to_head``); ``qh``, ``oh`` and ``stage_lse``
    ``2 e nq + 4 T U`` (``kernel.forward``, + the ring pass); ``oh``, the receive buffer and
    the re-laid-out ``o`` ``3 e nq``, + the send buffer if b > 1 (``head_to_seq``))).
    """
    e, T, a2a, hb = st.act_bytes, st.tokens, st.u > 1, st.batch > 1
    gm = upipe_geometry(st)
    nq, nkv, U = gm["nq"], gm["nkv"], gm["U"]
    stage = max(
        e * U * st.head_dim * st.dim * gm["strided"] + e * nq + _rope(nq, e),
        3 * e * nq if a2a else 0,
        2 * e * nq + 4 * T * U + _ring_fwd(st, nq, nkv), (3 + hb if a2a else 1) * e * nq)
    return T * st.n_heads * (st.head_dim * e + 4) + max(_upipe_kv(st), 2 * e * nkv + stage)


def upipe_backward_bytes(st: Setup) -> int:
    """Peak allocated by ``upipe_backward`` over its inputs (x, weights, out, lse, dout),
    without the returned weight grads (model_states counts those).

    ``dx`` in x's dtype ``e T dim`` (the GEMMs add into it in place, ``dx.addmm_``) + max(
    the K/V steps (:func:`_upipe_kv`); ``kh``/``vh`` ``2 e nkv`` + the chunk's fp32
    accumulators ``dkh``/``dvh`` ``8 nkv``, only when tau > 1 (from the first stage's kernel
    on) + a stage: the ``w_stage`` copy + max(``q`` and its RoPE; ``qh``, the ``o_stage``/
    ``do_stage`` copies, their pair and its send/receive ``(3|5) e nq (+4 e nq)``
    (``pair_seq_to_head``); ``qh``, ``oh``, ``doh``, ``dqh`` ``4 e nq`` + ``dk_s``, ``dv_s``
    ``2 e nkv`` + FA2 workspace (``kernel.backward``, + the ring pass); ``dqh``, the
    re-laid-out ``dq`` and its inverse RoPE incl. conj(freqs) ``4 s D``; ``dq`` + its wq-grad
    rows ``e U D dim``; with tau == 1 the last two also hold ``dk_s``, ``dv_s``, which are
    then the chunk's dK/dV); the chunk end: dK/dV (+ their casts to x's dtype when tau > 1;
    no-ops when tau == 1), their pair and its send/receive (``pair_head_to_seq``), and the
    inverse RoPE of ``dk``).  With ``fused_wo`` (``wo`` given) a stage's ``do_stage`` is not
    a slice of ``dout`` but the GEMM ``dy @ wo[:, stage heads]`` ``e nq`` (``_stage_dout``:
    ``qh``, the ``o_stage`` copy, the strided ``wo`` columns' copy ``e U D dim`` and the
    product), and then a tensor of its own in the pair step.
    """
    e, T, D, a2a, hb = st.act_bytes, st.tokens, st.head_dim, st.u > 1, st.batch > 1
    gm = upipe_geometry(st)
    nq, nkv, wst, conj = gm["nq"], gm["nkv"], gm["U"] * D * st.dim, 4 * st.s * D
    tau = gm["tau"]
    acc = 2 * max(e, 4) * nkv if tau > 1 else 0  # fp32 dK/dV summed over the chunk's stages
    held = 2 * e * nkv if tau == 1 else 0  # the kernel's dk_s, dv_s kept as the chunk's dK/dV
    casts = 2 * e * nkv if tau > 1 and e < 4 else 0  # dkh.to(x.dtype): a no-op otherwise
    o_copy, do_copy = gm["o_copy"], gm["o_copy"] or st.fused_wo
    stage = e * wst * gm["strided"] + max(
        e * nq + _rope(nq, e),
        (e * nq * (2 + o_copy) + e * wst * gm["strided"]) if st.fused_wo else 0,
        e * nq * (3 + o_copy + do_copy + (4 if a2a else 0)),
        3 * e * nq + _stage_kernel_bwd(st, nq, nkv, gm["gamma"] > 1) + _ring_bwd(st, nq, nkv),
        held + e * nq * (2 if a2a else 1) + _rope_inv(nq, e, conj),
        held + e * nq + e * wst)
    end = max(acc + held + casts + e * nkv * (2 + (4 + 2 * hb if a2a else 0)),
              2 * e * nkv + _rope_inv(nkv, e, conj))
    return e * T * st.dim + max(_upipe_kv(st), 2 * e * nkv + acc + stage, end)


def ulysses_bytes(st: Setup) -> dict:
    """Ulysses / USP / ring (``UlyssesStrategy`` and ``ulysses_attention``) under autograd;
    nq = T H D, nk = T H_kv D, nk' = rho nk.

    ``fwd``: xq, xk, xv ``e(nq + 2nk)`` + RoPE temporaries (TorchTitan's
    ``apply_rotary_emb``); then, with them alive, the replicas (``repeat_kv_heads``) and the
    K|V pair (``pack_pair``); (u > 1) q's send buffer + receive, or qh + K|V's
    ``e nq + 4 e nk'`` (``seq_to_head``); the kernel's out ``e nq`` + lse ``4 T H``
    (``kernel_attention``, + ring); ``head_to_seq``'s receive + re-laid-out copy ``2 e nq``
    (+ send buffer if b > 1).
    ``saved`` (autograd): qh, kvh, out, lse and (u > 1) wo's input.  ``bwd``: max(saved + dO
    + its all-to-all; saved + doh, dq, dk, dv (half a block's dk, dv in a ring) + FA2
    workspace (GQA when H != H_kv rho, + ring); dq + the two select-backward K|V grads (+
    head_to_seq); RoPE backward: fp32 dq and products of q and k + conj(freqs) ``4 T D``).
    """
    e, T, a2a, hb = st.act_bytes, st.tokens, st.u > 1, st.batch > 1
    rho = st.shape.rho
    nq, nk = T * st.n_heads * st.head_dim, T * st.n_kv_heads * st.head_dim
    nk2, lse = nk * rho, 4 * T * st.n_heads
    base = e * (nq + 2 * nk) + (2 * e * nk2 if rho > 1 else 0) + 2 * e * nk2
    heads = (e * (nq + 2 * nk2) if a2a else 0) + e * nq + lse
    fwd = max(e * (nq + 2 * nk) + _rope(nq + nk, e),
              base + (max(2 * e * nq, e * nq + 4 * e * nk2) if a2a else 0),
              base + heads + max((2 + hb) * e * nq if a2a else 0, _ring_fwd(st, nq, nk2)))
    saved = 2 * e * nq + 2 * e * nk2 + lse
    gqa = st.n_heads != st.n_kv_heads * rho
    # the kernel's dK, dV: on the worst rank of a causal ring, every step after the first
    # sees half of the block (ring_backward, src < rank), and the first holds no ring buffers
    dkv = 2 * e * nk2 if st.ring == 1 else e * nk2
    bwd = max(saved + e * nq * (3 if a2a else 1),
              saved + 2 * e * nq + dkv + _fa2_ws(st, nq, gqa) + _ring_bwd(st, nq, nk2),
              e * nq + 6 * e * nk2 + (2 * (2 + hb) * e * nk2 if a2a else 0),
              (8 if e < 4 else 4) * nq + 4 * nk + 4 * T * st.head_dim)
    return {"fwd": fwd, "bwd": bwd, "saved": saved + (e * nq if a2a else 0)}


def kept_attention_bytes(st: Setup) -> int:
    """One layer's attention result, output and fp32 LSE, ``T H (e D + 4)``: what UPipe's op
    saves (``out (B, S/C, H D)``, ``lse (n_stages, B, U/C, S)``) and what
    ``memory.keep_attention_output`` keeps (for Ulysses and USP the kernel's head-sharded
    ``out (B, S, H/C, D)`` and ``lse (B, H/C, S)``: the same sizes)."""
    return st.tokens * st.n_heads * (st.head_dim * st.act_bytes + 4)


def attention_bytes(st: Setup) -> dict:
    """Per style: ``fwd``/``bwd`` peaks and ``saved`` (kept from the recompute to backward).
    UPipe (a job with a stage schedule) saves only out + lse (the op's ``_save``); its
    backward holds them + dout ``e T H D`` (wo's input gradient), which ``fused_wo`` never
    makes (the op's backward takes the block's ``dh`` instead, held by ``io``).  With
    ``keep_attention`` UPipe's recompute replays the op (``_ReplayAttention``): its ``fwd`` is
    the kept result; Ulysses' recompute
    still runs everything but the kernel, which returns the kept result instead of an equal
    one it would allocate (``fwd`` unchanged).  With the local RoPE table both strategies
    take a view of it; with TorchTitan's full table they gather this rank's rows ``4 s D``
    (``UPipeStrategy``'s ``freqs_cis[positions[0]]``, TorchTitan's ``reshape_for_broadcast``),
    which autograd (TorchTitan's ``apply_rotary_emb``) or the UPipe op keeps until the
    attention's backward."""
    freqs = 0 if st.local_rope else 4 * st.s * st.head_dim
    if st.shape.schedule is not None:
        out = kept_attention_bytes(st)
        d_out = 0 if st.fused_wo else st.tokens * st.n_heads * st.head_dim * st.act_bytes
        # a kept result (keep_attention): the recompute replays the op, runs no stage
        fwd = out if st.keep_attention != "none" else upipe_forward_bytes(st)
        return {"fwd": fwd + freqs, "saved": out + freqs,
                "bwd": freqs + out + d_out + upipe_backward_bytes(st)}
    r = ulysses_bytes(st)
    return {"fwd": r["fwd"] + freqs, "saved": r["saved"] + freqs, "bwd": r["bwd"] + freqs}


# ------------------------------------------------------------------------ MLP, norm, loss
def mlp_bytes(st: Setup) -> dict:
    """SwiGLU MLP (TorchTitan's ``FeedForward``).  Untiled: autograd saves w1 x, silu, w3 x
    and the product ``4 e T F`` (fwd, + the output ``e T dim``); backward peaks in the
    product's backward (product freed; dp, ds, da3 added) at ``6 e T F``, before dx exists.
    Tiled (n = a tile's tokens): ``tiled_mlp_forward``'s output ``e T dim`` + a tile's silu,
    w3 x, y ``2 e n F + e n dim``; ``tiled_mlp_backward``'s ``dx`` ``e T dim`` + the fp32
    weight-grad accumulators ``dw1``/``dw2``/``dw3`` ``12 F dim`` + a tile's h1, h3, silu, a and
    ``add_mm_``'s fp32 upcasts, or h1, h3, silu, da, dh3: ``max(4e + 4, 5e) n F``."""
    e, T, F, dim = st.act_bytes, st.tokens, st.ffn_hidden, st.dim
    if not st.tiled_mlp:
        return {"fwd": 4 * e * T * F + e * T * dim, "bwd": 6 * e * T * F}
    n = _tile(st.s, st.mlp_tiles or auto_num_tiles(st.s, dim), st.batch)
    up = 4 if e < 4 else 0
    return {"fwd": e * T * dim + 2 * e * n * F + e * n * dim,
            "bwd": e * T * dim + 12 * F * dim + max(4 * e + up, 5 * e) * n * F + up * n * dim}


def norm_bytes(st: Setup) -> dict:
    """One RMSNorm.  ``saved``: output ``e T dim`` (kept by the next op) + fp32 rstd ``4T``;
    the composite path also keeps fp32 x and x*rstd ``8 T dim`` and its forward holds the fp32
    result.  ``bwd``: dx ``e T dim`` + op-math temporaries: none (fused CUDA kernel), 4 fp32
    (T, dim) (composite) or 4 fp32 tile tensors (``tiled_rms_norm_backward``; 3 in
    ``tiled_rms_norm_forward``)."""
    e, T, dim = st.act_bytes, st.tokens, st.dim
    saved = e * T * dim + 4 * T
    if st.tiled_norm:
        n = _tile(st.s, st.norm_tiles or auto_num_tiles(st.s, dim), st.batch)
        return {"saved": saved, "fwd": saved + 12 * n * dim, "bwd": e * T * dim + 16 * n * dim}
    if st.fused_rms_norm:
        return {"saved": saved, "fwd": saved, "bwd": e * T * dim}
    return {"saved": saved + 8 * T * dim, "fwd": saved + 12 * T * dim,
            "bwd": e * T * dim + 16 * T * dim}


def logits_bytes(st: Setup) -> int:
    """Loss head.  Untiled (TorchTitan: logits, ``.float()``, log_softmax): forward
    ``(e + 8) T V``; backward log_softmax output + nll grad + its grad ``12 T V``.  Chunked
    (c = a chunk's tokens): ``lse`` ``4T`` + max(``chunked_cross_entropy_forward``'s chunk:
    bf16 + fp32 logits or logsumexp's temporary ``max(e + 4, 8) c V``;
    ``chunked_cross_entropy_backward``'s ``dh`` ``e T dim`` + the fp32 ``dw`` ``4 V dim`` +
    max(a chunk's ``g`` + ``add_mm_``'s fp32 upcasts ``(4 + e) c V + 4 c dim``, the final cast
    ``e V dim``))."""
    e, T, V, dim = st.act_bytes, st.tokens, st.vocab, st.dim
    if not st.chunked_loss:
        return max(e + 8, 12) * T * V
    c = _tile(st.s, st.loss_chunks or math.ceil(T / st.loss_chunk_tokens), st.batch)
    fwd = max(e + 4, 8 if st.cuda_workspaces else 4) * c * V
    bwd = e * T * dim + 4 * V * dim + max((4 + e) * c * V + 4 * c * dim, e * V * dim)
    return 4 * T + max(fwd, bwd)


# ---------------------------------------------------------------------------------- total
def param_counts(st: Setup) -> dict:
    """Parameters per FSDP unit (TorchTitan apply_fsdp: embedding, each block, [norm, output]),
    from :class:`~.shape.ModelShape`."""
    m = st.shape.model
    return {"block": m.block_params, "embedding": m.embedding_params,
            "output": m.output_params, "total": m.total_params}


_GRADS_AFTER = {"norm_bwd": "mlp", "attention_bwd": "block"}  # made so far in a block


def model_states_bytes(st: Setup, layer: int | None = None, phase: str = "attention_bwd") -> int:
    """Parameters, gradients and optimizer state alive in phase ``phase`` of layer
    ``layer``'s recompute + backward (``None``: the loss), in a steady-state step (Adam's
    state exists).

    * always: fp32 params and Adam m and v, sharded over all N ranks, ``12 P / N``; with
      ``offload_optimizer`` m and v are in host memory during forward and backward
      (:func:`optimizer_state_bytes`), ``4 P / N``;
    * in the loss: no gradients yet (``zero_grad`` sets them to None); [norm, output] and the
      last block stay gathered after forward (TorchTitan reshards neither), ``p (P_out +
      P_block)``;
    * in layer k's backward: the fp32 sharded gradients of the units already reduced
      (output and layers above k) ``4 (P_out + (L - 1 - k) P_block) / N``; the previous
      unit's reduce-scatter input, which FSDP2 holds until the next reduce-scatter,
      ``r P_prev`` (r = 4 with ``mixed_precision_reduce = float32``; P_prev = P_out for the
      last layer, so the last layer holds the output's fp32 gradient); this block's
      unsharded gradients as far as its backward has made them: none in the recompute and
      the MLP's backward (``tiled_mlp_backward`` accumulates in fp32 and casts at its end), the MLP's
      ``3 p F dim`` in ffn_norm's backward, all ``p P_block`` in the attention's (an upper
      bound: its q/k/v/o gradients come at its end); this block gathered and the next one
      prefetched (the embedding after layer 0) ``p (P_block + P_next)``, but not where a
      segment's last layer regenerated its inputs (``offload_stride``): that gathered and
      released the blocks below, the prefetched one too (``offload._gathered``).

    Summed over the whole step, ``16 P / N`` is what the paper calls "Model"."""
    pc, p, n = param_counts(st), st.param_bytes, st.world
    static = 4 * pc["total"] // n + (0 if st.offload_optimizer else optimizer_state_bytes(st))
    if layer is None:
        return static + p * (pc["output"] + pc["block"])
    done = pc["output"] + (st.n_layers - 1 - layer) * pc["block"]
    prev = pc["output"] if layer == st.n_layers - 1 else pc["block"]
    nxt = pc["block"] if layer > 0 else pc["embedding"]
    if _regenerates(st, layer):
        nxt = 0
    grads = {"mlp": 3 * st.ffn_hidden * st.dim, "block": pc["block"]}.get(
        _GRADS_AFTER.get(phase), 0)
    return (static + 4 * done // n + st.reduce_bytes * prev + p * grads
            + p * (pc["block"] + nxt))


def optimizer_state_bytes(st: Setup) -> int:
    """Adam's fp32 m and v of this rank's shards, ``8 P / N`` (on the host during forward and
    backward with ``offload_optimizer``: ``OptimizerStateOffloader``'s buffers)."""
    return 8 * param_counts(st)["total"] // st.world


def host_inputs(st: Setup) -> int:
    """Block inputs in host buffers: one per offloaded layer; with ``offload_stride = k > 1``
    one per segment of ``k`` (its first layer's) + the ``k - 1`` scratch buffers the segments
    share (``k - 2`` without ``refetch_input``: the regenerated input of a segment's last
    layer is parked only to be refetched; ``offload._Segment``)."""
    if not st.offload:
        return 0
    n = st.n_layers - min(st.keep_layers, st.n_layers)
    k = st.offload_stride
    if k == 1 or n == 0:
        return n
    return -(-n // k) + (k - 1 if st.refetch_input else k - 2)


def regenerated_layers(st: Setup) -> int:
    """Layers whose input the backward regenerates with one more forward (``offload_stride
    = k``: all offloaded layers but each segment's first; their forwards run in the backward
    of the segment's last layer, before its recompute, and never peak above that recompute's
    forward phases: the same block forward, without the saved tensors)."""
    if not st.offload or st.offload_stride == 1:
        return 0
    n = st.n_layers - min(st.keep_layers, st.n_layers)
    return n - (-(-n // st.offload_stride))


def _regenerates(st: Setup, layer: int) -> bool:
    """Whether ``layer``'s backward regenerates its segment's inputs: the last layer of a
    segment of ``offload_stride > 1`` offloaded layers."""
    k = st.offload_stride
    return k > 1 and _offloaded(st, layer) and (layer - st.keep_layers) % k == k - 1


def _offloaded(st: Setup, layer: int) -> bool:
    return st.offload and 0 <= layer and layer >= st.keep_layers


def phases(st: Setup, layer: int | None = None) -> dict:
    """Activation bytes on top of model states + rope_table + checkpointed_inputs_device, per
    phase of layer ``layer``'s recompute + backward, and of the loss.  ``None``: the last
    layer (the most block-boundary tensors; every offloaded layer's phases are the same
    except for ``io``).

    ``io``: dout and dh ``2 e T dim`` (one, in the attention's backward, with
    ``inplace_grads``: dh is summed into dout's storage); an offloaded layer adds its reloaded input
    (``HostOffloader.reload``) and, with ``offload_prefetch`` and an offloaded layer before
    it, that layer's prefetched input (``HostOffloader.prefetch``): ``4 e T dim``, or
    ``3 e T dim`` without prefetch.  With ``keep_attention = "device"`` it also holds the kept
    results of the ``k`` layers below (:func:`kept_attention_bytes` each; this layer's own is
    its attention's ``saved``) and the loss those of all ``L``; with ``"host"`` an offloaded
    layer that prefetches holds the result of the layer below (on the host for every layer:
    ``prefetch(k - 1)`` fetches it even where that layer's input stays on the device).  The recomputed block output is not held: its producer is
    the residual add, so ``_release_if_unsaved`` frees it before the inner backward.  Block
    order (TorchTitan's ``TransformerBlock.forward``): attention_norm, attention,
    h = x + wo(.), ffn_norm, MLP, out = h + MLP(.) (``block_out``: both are alive there),
    and backward in reverse; the MLP and ffn_norm steps also
    hold the attention's saved tensors.  In the
    recompute's forward phases and the MLP's backward, ``dh`` does not exist yet: the MLP's dx
    (in ``mlp_bytes``'s backward, or made after its peak when untiled) becomes it.
    """
    e, T, dim = st.act_bytes, st.tokens, st.dim
    k = st.n_layers - 1 if layer is None else layer
    offloaded = _offloaded(st, k)
    prefetched = offloaded and st.offload_prefetch and _offloaded(st, k - 1)
    io = e * T * dim * (2 + offloaded + prefetched)
    if st.keep_attention == "device":  # the kept results of the layers below
        io += kept_attention_bytes(st) * k
    elif st.keep_attention == "host" and offloaded and st.offload_prefetch and k > 0:
        io += kept_attention_bytes(st)  # the layer below's result, prefetched with its input
    a, m, nm = attention_bytes(st), mlp_bytes(st), norm_bytes(st)
    held = io + nm["saved"] + a["saved"] + e * T * dim  # + ffn_norm's saved output
    no_dh = e * T * dim  # the recompute's forward phases: dh is made later, by the MLP's backward
    # refetch_input: the reloaded input is freed once the recompute has run, copied back for
    # the attention norm's backward (after the attention's, where the layer has peaked)
    no_x = e * T * dim if offloaded and st.refetch_input else 0
    # inplace_grads: dh is summed into dout's storage (every layer of the offloaded
    # checkpointing, kept ones too): one of io's two gradients once dh exists
    one_grad = e * T * dim if st.offload and st.inplace_grads else 0
    return {
        "attention_fwd": io - no_dh + nm["saved"] + a["fwd"],
        "norm_fwd": held - no_dh + nm["fwd"],
        "mlp_fwd": held - no_dh + nm["saved"] + m["fwd"],
        # the block's output (the last residual add) next to the MLP's: the tiles are gone
        "block_out": held - no_dh + nm["saved"] + (e * T * dim if st.tiled_mlp else m["fwd"])
                     + e * T * dim,
        "mlp_bwd": held - no_x + nm["saved"] + m["bwd"] - e * T * dim,  # m's dx is io's dh
        "norm_bwd": held - no_x + nm["bwd"],
        "attention_bwd": io - no_x - one_grad + nm["saved"] + a["bwd"],
        "loss": (2 * e * T * dim + nm["saved"] + logits_bytes(st)
                 + kept_attention_bytes(st) * st.n_layers * (st.keep_attention == "device")),
    }


def peak_location(st: Setup) -> tuple[int | None, str]:
    """Where the step peaks: ``(layer, phase)``, or ``(None, "loss")``.  The model states
    grow as the backward descends (each reduced layer leaves its sharded gradients until the
    optimizer step) while the activation phases are the same for every offloaded layer, so
    the peak is in the lowest offloaded layers (the first that also prefetches), in layer 0
    (which holds the gathered embedding), or in the loss."""
    best, where = model_states_bytes(st) + phases(st)["loss"], (None, "loss")
    for k in range(st.n_layers):
        for name, nbytes in phases(st, k).items():
            if name == "loss":  # counted once, above
                continue
            total = nbytes + model_states_bytes(st, k, name)
            if total > best:
                best, where = total, (k, name)
    return where


def breakdown(st: Setup) -> dict:
    """Per-rank bytes.  peak_device = model_states + rope_table (the complex64 freqs_cis:
    this rank's (S/C, D/2) rows, titan.llama3's ``Transformer._precompute_freqs_cis``, or
    TorchTitan's (S, D/2) on every rank) + checkpointed_inputs_device + max_phase; host =
    checkpointed_inputs_host + kept_attention_host (the offloader's buffers) +
    optimizer_state_host (``offload_optimizer``); where
    ``model_states`` and ``max_phase`` are taken where the step peaks (:func:`peak_location`);
    the *_transient and logits entries are each component's own peak (they do not add up)."""
    e, T, L = st.act_bytes, st.tokens, st.n_layers
    keep = min(st.keep_layers, L) if st.offload else L
    a, m, nm = attention_bytes(st), mlp_bytes(st), norm_bytes(st)
    layer, phase = peak_location(st)
    d = {
        "model_states": model_states_bytes(st, layer, phase),
        "rope_table": 4 * (st.s if st.local_rope else st.seq_len) * st.head_dim,
        "checkpointed_inputs_device": keep * e * T * st.dim,
        "checkpointed_inputs_host": host_inputs(st) * e * T * st.dim,
        "kept_attention_host": L * kept_attention_bytes(st) * (st.keep_attention == "host"),
        "optimizer_state_host": optimizer_state_bytes(st) * st.offload_optimizer,
        "attention_transient": max(a["fwd"], a["bwd"]),
        "mlp_transient": max(m["fwd"], m["bwd"]),
        "norm_transient": max(nm["fwd"], nm["saved"] + nm["bwd"]),
        "logits": logits_bytes(st),
        "max_phase": phases(st, layer)[phase],
    }
    d["peak_device"] = sum(d[k] for k in ("model_states", "rope_table",
                                          "checkpointed_inputs_device", "max_phase"))
    d["host"] = (d["checkpointed_inputs_host"] + d["kept_attention_host"]
                 + d["optimizer_state_host"])
    return d


def stack(st: Setup, on: bool = True) -> Setup:
    """``st`` with the [memory] stack on (offload keep 1, auto tiles, 1K-token chunks) or off."""
    return replace(st, offload=on, keep_layers=1, tiled_mlp=on, mlp_tiles=0, tiled_norm=on,
                   norm_tiles=0, chunked_loss=on, loss_chunk_tokens=DEFAULT_CHUNK_TOKENS,
                   loss_chunks=0)


# ------------------------------------------------------------------ train.py's options
def element_bytes(dtype_name: str) -> int:
    """Bytes of a ``training.mixed_precision_*`` element: 4 for float32, else 2."""
    return 4 if dtype_name == "float32" else 2


def from_job_config(job_config, world: int, model_args=None, chunk_heads: int | None = None,
                    **changes) -> Setup:
    """The :class:`Setup` of ``job_config`` on ``world`` ranks, as the trainer builds the job
    (:meth:`~.shape.JobShape.from_job_config`, with its ``chunk_heads``; ``benchmark.n_layers``
    limits the depth): precision from ``training.mixed_precision_*``, the ``[memory]`` stack
    from its section.  ``changes``: other :class:`Setup` fields (e.g. ``cuda_workspaces``)."""
    mem, tr = job_config.memory, job_config.training
    e = element_bytes(tr.mixed_precision_param)
    return Setup(
        JobShape.from_job_config(job_config, world, model_args, chunk_heads),
        param_bytes=e, reduce_bytes=element_bytes(tr.mixed_precision_reduce), act_bytes=e,
        offload=mem.offload_activations, keep_layers=mem.offload_keep_layers,
        offload_prefetch=mem.offload_prefetch, keep_attention=mem.keep_attention_output,
        offload_stride=mem.offload_stride,
        offload_optimizer=mem.offload_optimizer_state, refetch_input=mem.offload_refetch_input,
        inplace_grads=mem.offload_inplace_residual_grads, fused_wo=mem.fuse_output_projection,
        tiled_mlp=mem.tiled_mlp, mlp_tiles=mem.mlp_tiles,
        tiled_norm=mem.tiled_norm, norm_tiles=mem.norm_tiles, chunked_loss=mem.chunked_loss,
        loss_chunks=mem.loss_chunks, **changes,
    )
