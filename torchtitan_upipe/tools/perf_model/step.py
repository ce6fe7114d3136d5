"""A step-time model next to the memory model: modeled tokens/s per GPU and MFU.

Every figure it gives is **modeled**, never a measurement.  No GPU measurement calibrates it
yet: :func:`calibrate` takes measured tokens/s when there are some, and says how far the
model was from them.  One rank of a job (:class:`~torchtitan_upipe.titan.memory_model.Setup`),
one training step under full activation checkpointing::

    step = GEMMs / gemm rate + attention forward / fwd rate + attention backward / bwd rate
           + ring merges / HBM + exposed all-to-alls + exposed ring and FSDP traffic
           + exposed offload copies

* **GEMMs** (:func:`gemm_flops`), per layer and local token: the projections
  ``qkv = 2 dim D (H + 2 H_kv)`` and ``o = 2 dim H D``, the MLP ``6 dim F``, each run in the
  forward, again in the recompute, and twice in the backward (input and weight gradients).
  UPipe's backward projects Q, K and V once more (its op saves no Q/K/V).  The tiled MLP's
  backward recomputes the two up-projections (``4 dim F``).  The output layer runs
  ``2 V dim`` forward and ``4 V dim`` backward, plus ``2 V dim`` with the chunked loss
  (its backward recomputes each chunk's logits).  The recompute of the output layer does
  not exist (it is outside the checkpointed blocks).
* **Attention kernels** (:func:`attention_flops`): a causal forward is ``2 S H D`` FLOPs per
  local token (``QK^T`` and ``PV`` over half the sequence on average; a zigzag ring
  balances the ranks, so the same per rank).  It runs in the forward and in the recompute;
  the backward is 2.5 forwards (FlashAttention's five matmuls to two).
  ``memory.keep_attention_output`` removes the recompute's kernel forward, and for UPipe
  also the recompute's Q/K/V projections (the op is replayed, no stage runs).
  ``memory.offload_stride`` adds one forward (GEMMs and attention kernel) of each layer whose
  input the backward regenerates (its all-to-alls are not counted).
* **Ring merges** (:func:`ring_merge_bytes`): memory-bound fp32 merges, at the HBM rate.
* **Communication**: :mod:`.comm`'s bytes per style (``keep_attention`` drops UPipe's and
  the ring's recompute traffic); all-to-alls are on the critical path, ring p2p and FSDP
  collectives hide behind compute (:func:`~.comm.exposed_comm_seconds`).
* **Offload** (:func:`offload_seconds`): each offloaded block input goes to the host in the
  forward and back in the backward, ``e T dim`` bytes each way, and with
  ``keep_attention_output = "host"`` every layer's attention result too
  (``T H (e D + 4)``).  Pinned copies run on a side stream and are exposed only where a
  layer's copies take longer than its compute (or in the backward, all of them when
  ``offload_prefetch`` is off); pageable copies are synchronous.

Not modelled: elementwise kernels (RoPE, norms, SwiGLU, the loss's softmax), launch
overheads, kernel efficiency at small head counts or short ring blocks, stragglers.

**MFU** is the paper's convention (:func:`model_flops_per_token`, causal: ``6 P`` for the
matmuls plus ``6 L H D S`` for causal attention, no recompute) over the dense bf16 peak.
TorchTitan's logged ``mfu`` counts attention as non-causal (``12 L H D S``,
``causal=False``), so at long context it reads up to twice as high.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...titan import memory_model as mm
from . import comm as cm


@dataclass(frozen=True)
class Rates:
    """What one GPU sustains; every field is an assumption with its source in ``sources``.

    ``peak_tflops``: dense bf16 peak (for MFU); ``gemm_tflops``: achieved by large bf16
    GEMMs; ``attn_fwd_tflops``/``attn_bwd_tflops``: achieved by the attention kernel's
    forward and backward (causal, head dim 128, long sequences; useful FLOPs, the causal
    count); ``hbm_TBps``: memory bandwidth; ``pinned_GBps``/``pageable_GBps``: host <-> device
    copies per GPU with all GPUs of a node copying; ``network``: NVLink and InfiniBand."""

    name: str
    peak_tflops: float
    gemm_tflops: float
    attn_fwd_tflops: float
    attn_bwd_tflops: float
    hbm_TBps: float
    pinned_GBps: float = 25.0
    pageable_GBps: float = 8.0
    network: cm.Network = field(default_factory=cm.Network)
    sources: str = ""


_HOPPER_SOURCES = (
    "peak: NVIDIA H100/H200 SXM datasheets, 989 dense BF16 TFLOPS; gemm: about 70% of peak, "
    "what cuBLAS reaches on large BF16 GEMMs (assumed); attention: about 600 TFLOPS forward and "
    "450 backward for causal head-dim-128 BF16 attention at long sequences, read off the "
    "FlashAttention-3 paper's (Shah et al., 2024) H100 plots for cuDNN and FA3 (assumed for "
    "torch's cuDNN SDPA); HBM: datasheets (3.35 / 4.8 TB/s); PCIe Gen5 x16: 64 GB/s per "
    "direction, 25 assumed per GPU with 8 GPUs copying at once (8 pageable); network: "
    "comm.Network (NVLink4 450 GB/s per direction, one 400 Gb/s NIC per GPU, 70% efficiency)")

RATES = {
    "h100": Rates("H100 SXM 80 GB", 989.0, 700.0, 600.0, 450.0, 3.35, sources=_HOPPER_SOURCES),
    "h200": Rates("H200 SXM 141 GB", 989.0, 700.0, 600.0, 450.0, 4.8, sources=_HOPPER_SOURCES),
}
"""Defaults.  H200 has H100's compute (same SMs and clocks), more and faster HBM."""


def _keeps(st: mm.Setup) -> bool:
    return st.keep_attention != "none"


def _upipe(st: mm.Setup) -> bool:
    return st.shape.schedule is not None


def gemm_flops(st: mm.Setup) -> dict[str, float]:
    """GEMM FLOPs of one rank's step, by part (see the module docstring)."""
    m, T = st.shape.model, st.tokens
    qkv = 2 * m.dim * m.head_dim * (m.n_heads + 2 * m.n_kv_heads)
    o = 2 * m.dim * m.n_heads * m.head_dim
    mlp = 6 * m.dim * m.ffn_hidden
    passes = 4  # forward, recompute, backward (input and weight gradients)
    # UPipe's backward re-projects Q, K and V; with a kept result its replayed recompute
    # projects nothing, which evens that out
    proj = (passes + (_upipe(st) and not _keeps(st))) * qkv
    mlp_total = passes * mlp + (4 * m.dim * m.ffn_hidden if st.tiled_mlp else 0)
    out = (6 + (2 if st.chunked_loss else 0)) * m.vocab * m.dim
    # offload_stride: one more forward of each regenerated layer (memory_model's count)
    again = mm.regenerated_layers(st)
    return {"projections": T * (m.n_layers * (proj + passes * o) + again * (qkv + o)),
            "mlp": T * (m.n_layers * mlp_total + again * mlp), "output": T * out}


def attention_flops(st: mm.Setup) -> dict[str, float]:
    """Causal attention kernel FLOPs of one rank's step: ``forward`` (the forward pass and,
    without a kept result, the recompute's) and ``backward`` (2.5 forwards)."""
    m = st.shape.model
    one = 2 * st.tokens * st.seq_len * m.n_heads * m.head_dim
    again = mm.regenerated_layers(st)  # offload_stride's regenerating forwards
    return {"forward": one * (m.n_layers * kernel_forward_passes(st) + again),
            "backward": 2.5 * one * m.n_layers}


def kernel_forward_passes(st: mm.Setup) -> int:
    """Attention kernel forwards per layer and step: 2 under full checkpointing, 1 with a
    kept result (``memory.keep_attention_output``)."""
    return 1 if _keeps(st) else 2


def ring_merge_bytes(st: mm.Setup) -> float:
    """HBM bytes one rank's ring merges move in a step (0 without a ring dimension): per
    layer, ``R - 1`` merges of the layer's query elements ``nq = b (S/R) (H/u) D`` in each
    forward pass (``20 nq``: out, block_out, the mixing weights in fp32) and in the backward
    (fp32 ``dq``, ``8 nq``), and ``R`` fp32 ``dK|dV`` accumulations (``16 nkv``,
    ``nkv = b (S/R) (H_kv rho / u) D``)."""
    sh, m = st.shape, st.shape.model
    r = sh.ring
    if r == 1:
        return 0.0
    q_tokens = sh.batch * sh.seq_len // r
    nq = q_tokens * m.n_heads // sh.ulysses * m.head_dim
    nkv = q_tokens * m.n_kv_heads * sh.rho // sh.ulysses * m.head_dim
    return m.n_layers * ((r - 1) * (kernel_forward_passes(st) * 20 + 8) * nq + r * 16 * nkv)


def offload_bytes(st: mm.Setup) -> float:
    """Bytes of one block input, ``e T dim``: what an offloaded layer copies to the host and
    back (:func:`~torchtitan_upipe.titan.memory_model.kept_attention_bytes` more per layer
    with ``keep_attention_output = "host"``)."""
    return st.act_bytes * st.tokens * st.dim


def offload_seconds(st: mm.Setup, rates: Rates, layer_compute_s: float,
                    pinned: bool = True) -> float:
    """Exposed seconds of the host copies (see the module docstring); ``layer_compute_s``:
    one layer's compute, which a pinned side-stream copy overlaps."""
    if not st.offload:
        return 0.0
    x = offload_bytes(st)
    kept = mm.kept_attention_bytes(st) if st.keep_attention == "host" else 0
    keep = min(st.keep_layers, st.n_layers)
    # bytes each layer copies to the host, and back: its input if offloaded, its result
    per_layer = [(x if j >= keep else 0) + kept for j in range(st.n_layers)]
    if not pinned:
        return 2 * sum(per_layer) / (rates.pageable_GBps * 1e9)
    rate = rates.pinned_GBps * 1e9
    # a layer's copy against its compute (forward: a third of it; backward: the recompute
    # and the backward, two thirds), hidden up to it; without prefetch the backward waits
    fwd = sum(max(0.0, b / rate - layer_compute_s / 3) for b in per_layer)
    if st.offload_prefetch:
        bwd = sum(max(0.0, b / rate - 2 * layer_compute_s / 3) for b in per_layer)
    else:
        bwd = sum(per_layer) / rate
    return fwd + bwd


def model_flops_per_token(shape, seq_len: int, causal: bool = True) -> float:
    """Model FLOPs per token for MFU: ``6 P`` for the matmuls (``P``: the parameters but the
    embedding) and ``6 L H D S`` for causal attention (``causal=False``: ``12 L H D S``,
    TorchTitan's ``get_dense_model_nparams_and_flops``), no recompute.  ``shape``: a
    :class:`~torchtitan_upipe.titan.shape.ModelShape`."""
    attention = 6 * shape.n_layers * shape.n_heads * shape.head_dim * seq_len
    matmul = 6 * (shape.total_params - shape.embedding_params)
    return matmul + attention * (1 if causal else 2)


@dataclass(frozen=True)
class StepTime:
    """One modeled step of one rank, seconds by part (all exposed parts; see the module doc)."""

    gemm_s: float
    attention_fwd_s: float
    attention_bwd_s: float
    merge_s: float
    a2a_s: float
    hidden_comm_exposed_s: float
    offload_s: float
    tokens_per_rank: int
    flops_per_token: float
    peak_tflops: float
    comm: dict = field(default_factory=dict, compare=False)

    @property
    def compute_s(self) -> float:
        return self.gemm_s + self.attention_fwd_s + self.attention_bwd_s

    @property
    def step_s(self) -> float:
        return (self.compute_s + self.merge_s + self.a2a_s + self.hidden_comm_exposed_s
                + self.offload_s)

    @property
    def tps(self) -> float:
        """Tokens/s per GPU (TorchTitan's ``tps``: this rank's tokens over the step)."""
        return self.tokens_per_rank / self.step_s

    @property
    def mfu(self) -> float:
        """Model FLOPs utilization, the paper's convention (:func:`model_flops_per_token`)."""
        return self.tps * self.flops_per_token / (self.peak_tflops * 1e12)


def step_time(st: mm.Setup, rates: Rates, pinned: bool = True) -> StepTime:
    """The modeled step of ``st`` on ``rates``' GPUs (see the module docstring)."""
    g, a = gemm_flops(st), attention_flops(st)
    gemm = sum(g.values()) / (rates.gemm_tflops * 1e12)
    fwd = a["forward"] / (rates.attn_fwd_tflops * 1e12)
    bwd = a["backward"] / (rates.attn_bwd_tflops * 1e12)
    compute = gemm + fwd + bwd
    job = cm.CommJob(st.shape, act_bytes=st.act_bytes, param_bytes=st.param_bytes,
                     grad_bytes=st.reduce_bytes, keep_attention=_keeps(st))
    br = cm.step_comm_seconds(job, rates.network)
    hidden = br["ring_s"] + br["fsdp_s"]
    layer_compute = (compute - g["output"] / (rates.gemm_tflops * 1e12)) / max(1, st.n_layers)
    return StepTime(
        gemm_s=gemm, attention_fwd_s=fwd, attention_bwd_s=bwd,
        merge_s=ring_merge_bytes(st) / (rates.hbm_TBps * 1e12),
        a2a_s=br["a2a_s"], hidden_comm_exposed_s=max(0.0, hidden - compute),
        offload_s=offload_seconds(st, rates, layer_compute, pinned),
        tokens_per_rank=st.tokens,
        flops_per_token=model_flops_per_token(st.shape.model, st.seq_len),
        peak_tflops=rates.peak_tflops, comm=br)


@dataclass(frozen=True)
class Calibration:
    """Measured against modeled tokens/s: ``scale`` (the median of measured / modeled), the
    modeled figures times it, and the error left (the largest ``|scaled / measured - 1|``)."""

    scale: float
    max_error: float
    n: int


def calibrate(pairs: list[tuple[float, float]]) -> Calibration:
    """``pairs`` of (modeled, measured) tokens/s per GPU, from GPU runs of the same configs."""
    if not pairs:
        raise ValueError("no measurements to calibrate the step-time model with")
    ratios = sorted(meas / model for model, meas in pairs)
    mid = len(ratios) // 2
    scale = ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2
    err = max(abs(scale * model / meas - 1) for model, meas in pairs)
    return Calibration(scale, err, len(pairs))


__all__ = ["RATES", "Calibration", "Rates", "StepTime", "attention_flops", "calibrate",
           "gemm_flops", "kernel_forward_passes", "model_flops_per_token", "offload_bytes",
           "offload_seconds", "ring_merge_bytes", "step_time"]
