"""A predicted step time, to rank the configurations that fit.  Not a measurement.

No GPU figure calibrates it yet, so its parts are stated assumptions, each a parameter of
:class:`Hardware`::

    step = compute + ring merges + exposed communication + exposed offload copies

* **compute**: the step's matmul and attention FLOPs per rank (:func:`step_flops`) at a
  fraction ``mfu`` of the GPU's dense bf16 peak;
* **ring merges**: a ring pass merges each step's partial output into fp32 accumulators
  (``ring_forward``: read and write ``out``, ``block_out``, the mixing weights, about
  ``20`` bytes per query element; ``ring_backward``: the fp32 ``dq`` and the travelling
  ``dK|dV`` accumulators): memory-bound, at the GPU's HBM bandwidth (:func:`ring_merge_bytes`);
* **communication**: :mod:`..perf_model.comm` (bytes and collectives per style, on its
  assumed :class:`~..perf_model.comm.Network`); the ring's p2p and FSDP's prefetched
  collectives hide behind compute, the all-to-alls do not;
* **offload**: each offloaded block input goes to the host in the forward and back in the
  backward (``e T dim`` bytes each way).  Pinned copies run on a side stream: the forward's
  hide, the backward's hide with ``offload_prefetch`` (the copy overlaps the layer above)
  and are waited for without it; pageable copies are synchronous both ways.

What it ranks well: styles and ``U`` that move more bytes or launch more collectives
(UPipe sends 4/3 of Ulysses' all-to-all bytes and re-projects Q/K/V in its backward; a small
``U`` launches more, smaller collectives), and offload choices.  What it does not see:
kernel efficiency at small head counts, the tiles' launch overhead, stragglers.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...titan import memory_model as mm
from ...titan.fitting import Gpu
from ..perf_model import comm as cm
from ..perf_model.step import ring_merge_bytes


@dataclass(frozen=True)
class Hardware:
    """The assumptions of the step-time prediction (see the module docstring)."""

    gpu: Gpu
    mfu: float = 0.5            # achieved fraction of the dense bf16 peak
    pinned_GBps: float = 25.0   # host <-> device copy rate of pinned buffers, per GPU
    pageable_GBps: float = 8.0  # ... of pageable buffers
    network: cm.Network = cm.Network()


def step_flops(st: mm.Setup) -> float:
    """FLOPs one rank runs in a step under full activation checkpointing.

    Per layer and local token: the block's matmuls ``2 P_block`` per pass, three passes'
    worth in forward + backward and one more in the recompute (``8 P_block``); causal
    attention ``2 S H D`` per token per forward pass (QK^T and PV over half the sequence on
    average), 1 + 1 + 2.5 passes (FA2's backward is five matmuls to the forward's two);
    UPipe's backward projects Q, K and V again (``2 dim D (H + 2 H_kv)``).  The output layer
    ``6 V dim`` (not recomputed)."""
    m, sh = st.shape.model, st.shape
    per_token = 8 * m.block_params + 2 * sh.seq_len * m.n_heads * m.head_dim * 4.5
    if sh.schedule is not None:
        per_token += 2 * m.dim * m.head_dim * (m.n_heads + 2 * m.n_kv_heads)
    return st.tokens * (m.n_layers * per_token + 6 * m.vocab * m.dim)


@dataclass(frozen=True)
class Prediction:
    compute_s: float
    merge_s: float         # ring merges (HBM-bound)
    comm_s: float          # exposed
    offload_s: float       # exposed
    tokens_per_rank: int

    @property
    def step_s(self) -> float:
        return self.compute_s + self.merge_s + self.comm_s + self.offload_s

    @property
    def tps(self) -> float:
        """Tokens/s per GPU, TorchTitan's ``tps``: this rank's tokens over the step."""
        return self.tokens_per_rank / self.step_s


def offload_seconds(st: mm.Setup, hw: Hardware, pinned: bool = True) -> float:
    """Exposed seconds of the offload copies (see the module docstring)."""
    if not st.offload:
        return 0.0
    layers = max(0, st.n_layers - st.keep_layers)
    one = st.act_bytes * st.tokens * st.dim
    if not pinned:
        return 2 * layers * one / (hw.pageable_GBps * 1e9)
    return 0.0 if st.offload_prefetch else layers * one / (hw.pinned_GBps * 1e9)


def predict(st: mm.Setup, hw: Hardware, pinned: bool = True) -> Prediction:
    compute = step_flops(st) / (hw.gpu.bf16_tflops * 1e12 * hw.mfu)
    merge = ring_merge_bytes(st) / (hw.gpu.hbm_TBps * 1e12)
    job = cm.CommJob(st.shape, act_bytes=st.act_bytes, param_bytes=st.param_bytes,
                     grad_bytes=st.reduce_bytes)
    br = cm.step_comm_seconds(job, hw.network)
    exposed = cm.exposed_comm_seconds(br, compute, overlap=("ring", "fsdp"))
    return Prediction(compute, merge, exposed, offload_seconds(st, hw, pinned), st.tokens)


__all__ = ["Hardware", "Prediction", "offload_seconds", "predict", "ring_merge_bytes",
           "step_flops"]
