"""A parameterized model of the communication the fake backend does not time.

``train.py --comm.mode fake_backend`` runs one rank of an ``N``-GPU job with no-op
collectives, so its step time is compute only (:mod:`.runner`).  This module counts, per rank
and per training step, the bytes and collectives each context-parallel style and FSDP move,
and turns them into seconds with an explicit, assumed :class:`Network`.

Notation: ``B`` batch, ``S`` global sequence length, ``C`` CP degree, ``u`` all-to-all
(Ulysses) degree, ``R = C / u`` ring degree, ``s = S / C`` local tokens, ``H`` query heads,
``H_kv`` KV heads, ``H_kv' = H_kv * rho`` virtual KV heads (``rho`` = replication when
``H_kv < u``), ``D`` head dim, ``e`` bytes per activation element (2 for bf16), ``N`` FSDP
ranks (= NGPU).  Every size comes from the job's :class:`~...titan.shape.JobShape` (UPipe's
from its :class:`~...cp.upipe.schedule.UPipeSchedule`).

Volumes are what one rank **sends** (= receives):

* all-to-all of a local buffer of ``X`` bytes over ``k`` ranks: ``X * (k-1)/k`` (the part
  that stays local is not sent);
* ring p2p: one block per send; all-gather of ``P`` bytes (the whole tensor) over ``N``
  ranks and reduce-scatter of ``P`` bytes: ``P * (N-1)/N``.

One training step with full activation checkpointing runs every layer's forward twice
(forward, recomputed forward) and its backward once, so per layer:

``ulysses`` (:mod:`torchtitan_upipe.cp.ulysses`; autograd's backward of each all-to-all is
the inverse all-to-all)::

    forward   3 a2a: q (B s H D e), fused k|v (B s 2 H_kv' D e), o (B s H D e)
    recompute the same 3
    backward  3 a2a: do (H), dq (H), fused dk|dv (2 H_kv')          [bf16 gradients]
    bytes = (2 (2H + 2H_kv') + (2H + 2H_kv')) * B s D e * (u-1)/u = 6 (H + H_kv') B s D e (u-1)/u

``upipe`` (:mod:`torchtitan_upipe.cp.upipe.functional`, schedule from
:class:`~torchtitan_upipe.cp.upipe.schedule.UPipeSchedule`: ``n_chunks`` KV chunks of
``u*kappa`` virtual KV heads, ``n_stages = H/U`` stages of ``U`` query heads)::

    forward   per chunk: fused k|v (B s 2 u kappa D e);  per stage: q (B s U D e), o (U)
              count n_chunks + 2 n_stages; bytes = (2H + 2H_kv') B s D e (u-1)/u  == Ulysses'
              (n_chunks * u * kappa = H_kv': each K/V head is sent once)
    recompute the same
    backward  per chunk: k|v recompute (2 u kappa), dk|dv (2 u kappa);
              per stage: q recompute (U), fused o|do (2U), dq (U)
              count 2 n_chunks + 3 n_stages; bytes = (4H + 4H_kv') B s D e (u-1)/u
    total     8 (H + H_kv') B s D e (u-1)/u: 4/3 of Ulysses (UPipe re-sends instead of saving)

ring (our zigzag ring, :mod:`torchtitan_upipe.cp.ring`, the ring dimension of ``usp`` and of
``upipe`` with ``u < C``; one *ring pass* per attention kernel call, K|V block of the ring
rank's ``S/R`` tokens and ``h`` KV heads: ``Bkv = B (S/R) 2 h D e``)::

    forward pass   R-1 p2p sends of Bkv
    backward pass  R-1 sends of Bkv + R sends of the fp32 dK|dV accumulator (Bkv * 4/e)
    per layer      2 forward passes + 1 backward pass per kernel call; Ulysses calls the kernel
                   once (h = H_kv'/u), UPipe once per stage (h = kappa: every stage re-sends
                   its chunk's K/V around the ring)

``ring`` (TorchTitan's built-in ring, torch's experimental DTensor CP, ``u = 1``, ``R = C``):
the same bytes with ``h = H_kv`` (assumes SDPA's ``enable_gqa`` keeps K/V at ``H_kv`` heads);
with ``parallelism.context_parallel_rotate_method = "allgather"`` (TorchTitan's default) each
pass gathers the K|V blocks in one all-gather (count 1), with ``"alltoall"`` (the paper's
"Native PyTorch" baseline) in ``R-1`` permutes; the backward dK|dV always rotate with ``R``
all-to-all permutes.

FSDP2 (``fully_shard`` per block over all ``N`` ranks, bf16 params, fp32 reduce, TorchTitan's
default ``reshard_after_forward=True`` for the blocks): per layer of ``P`` parameters
``fsdp_all_gathers`` all-gathers of ``P * 2`` bytes and one reduce-scatter of ``P * 4`` bytes.
**Two** all-gathers, not three: the all-gather of FSDP2's pre-backward hook (on the block's
output) serves both the recomputed forward and the backward.  The recompute does not unshard
again: our offloaded checkpoint (:mod:`torchtitan_upipe.memory.offload`) and TorchTitan's
checkpoint wrapper re-run the block's inner ``forward`` without FSDP's module hooks, and even
through the hooks FSDP2's ``_pre_forward`` skips the unshard in ``PRE_BACKWARD`` state
(``torch/distributed/fsdp/_fully_shard/_fsdp_state.py``).  ``fsdp_all_gathers=3`` models a
wrapper that reshards in between.
Non-layer parameters: ``tok_embeddings`` (resharded: 2 all-gathers) and ``norm + output``
(``reshard_after_forward=False``: 1 all-gather), one reduce-scatter each.

Time (:func:`transfer_seconds`): ``bytes / (bandwidth * efficiency) + count * latency``.  A
group whose ranks all sit in one node (``gpus_per_node`` consecutive ranks) uses NVLink;
otherwise ring-based collectives (p2p, all-gather, reduce-scatter) run at the InfiniBand
rate, and an all-to-all takes ``max(on-node bytes / NVLink, off-node bytes / IB)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ...titan.shape import JobShape

PHASES = ("forward", "recompute", "backward")
CATEGORIES = ("a2a", "ring", "fsdp")


@dataclass(frozen=True)
class Network:
    """Assumed network of an H100 cluster; every number is a parameter, none is measured.

    ``nvlink_GBps``: per GPU per direction (H100 NVLink4: 900 GB/s bidirectional);
    ``ib_GBps``: per GPU (one NDR 400 Gb/s NIC per GPU = 50 GB/s); ``efficiency``: the achieved
    fraction of those rates; ``latency_us``: fixed cost per collective or p2p send;
    ``gpus_per_node``: size of an NVLink domain.
    """

    nvlink_GBps: float = 450.0
    ib_GBps: float = 50.0
    efficiency: float = 0.7
    latency_us: float = 20.0
    gpus_per_node: int = 8


@dataclass(frozen=True)
class CommJob:
    """One training job for the model: its :class:`~...titan.shape.JobShape` and the element
    sizes of what moves.  ``act_bytes``/``param_bytes``: bytes of an activation / parameter
    element in the forward (bf16 = 2); gradients are reduced in ``grad_bytes`` (fp32 = 4);
    ring dK|dV accumulators travel in ``acc_bytes`` (fp32 = 4).  ``rotate_method`` matters
    to TorchTitan's ring only (style ``ring``): "allgather" | "alltoall".
    ``keep_attention``: ``memory.keep_attention_output`` is on, so the recompute replays the
    attention: UPipe's recompute sends nothing, a ring's recompute runs no pass; Ulysses'
    recompute still sends q, k|v and o (its kernel backward needs them)."""

    shape: JobShape
    act_bytes: int = 2
    param_bytes: int = 2
    grad_bytes: int = 4
    acc_bytes: int = 4
    fsdp_all_gathers: int = 2
    rotate_method: str = "allgather"
    keep_attention: bool = False

    @property
    def local_tokens(self) -> int:
        """``B * s``: tokens of this rank (sequence-sharded layout)."""
        return self.shape.local_tokens


@dataclass(frozen=True)
class Transfer:
    """``count`` collectives of one kind in one phase; ``bytes`` is their total, per rank.

    The group is ``group_size`` ranks ``group_stride`` apart (its span decides the link).
    ``kind``: "all-to-all" | "p2p" | "all-gather" | "reduce-scatter".
    """

    name: str
    phase: str
    category: str
    kind: str
    bytes: float
    count: int
    group_size: int
    group_stride: int = 1


def a2a_volume(local_bytes: float, degree: int) -> float:
    """Bytes one rank sends in an all-to-all of a ``local_bytes`` buffer: ``X (k-1)/k``."""
    return local_bytes * (degree - 1) / degree


def gather_volume(full_bytes: float, degree: int) -> float:
    """Bytes one rank sends (receives) in an all-gather / reduce-scatter of ``full_bytes``."""
    return full_bytes * (degree - 1) / degree


# ----------------------------------------------------------------------------- per-layer volumes
def ulysses_layer(job: CommJob) -> list[Transfer]:
    """The 9 all-to-alls of one layer (3 forward, 3 recompute, 3 backward), see module doc."""
    shape, u = job.shape.model, job.shape.ulysses
    if u == 1:
        return []
    hkv = shape.n_kv_heads * job.shape.rho
    unit = job.local_tokens * shape.head_dim * job.act_bytes  # bytes of one head, local tokens
    out = []
    for phase in ("forward", "recompute"):
        out += [
            Transfer("q", phase, "a2a", "all-to-all", a2a_volume(shape.n_heads * unit, u), 1, u),
            Transfer("k|v", phase, "a2a", "all-to-all", a2a_volume(2 * hkv * unit, u), 1, u),
            Transfer("o", phase, "a2a", "all-to-all", a2a_volume(shape.n_heads * unit, u), 1, u),
        ]
    out += [
        Transfer("do", "backward", "a2a", "all-to-all", a2a_volume(shape.n_heads * unit, u), 1, u),
        Transfer("dq", "backward", "a2a", "all-to-all", a2a_volume(shape.n_heads * unit, u), 1, u),
        Transfer("dk|dv", "backward", "a2a", "all-to-all", a2a_volume(2 * hkv * unit, u), 1, u),
    ]
    return out


def upipe_layer(job: CommJob) -> list[Transfer]:
    """UPipe's all-to-alls of one layer, counted from its :class:`UPipeSchedule`."""
    u, sched = job.shape.ulysses, job.shape.schedule
    unit = job.local_tokens * job.shape.model.head_dim * job.act_bytes
    kv = a2a_volume(2 * sched.chunk_kv_heads * unit, u)  # one chunk's fused K|V
    q = a2a_volume(sched.chunk_heads * unit, u)  # one stage's Q (or O, or dQ)
    nc, ns = sched.n_chunks, sched.n_stages
    out = []
    for phase in ("forward", "recompute"):
        out += [
            Transfer("k|v", phase, "a2a", "all-to-all", nc * kv, nc, u),
            Transfer("q", phase, "a2a", "all-to-all", ns * q, ns, u),
            Transfer("o", phase, "a2a", "all-to-all", ns * q, ns, u),
        ]
    out += [
        Transfer("k|v (recompute)", "backward", "a2a", "all-to-all", nc * kv, nc, u),
        Transfer("q (recompute)", "backward", "a2a", "all-to-all", ns * q, ns, u),
        Transfer("o|do", "backward", "a2a", "all-to-all", ns * 2 * q, ns, u),
        Transfer("dq", "backward", "a2a", "all-to-all", ns * q, ns, u),
        Transfer("dk|dv", "backward", "a2a", "all-to-all", nc * kv, nc, u),
    ]
    return out


def ring_layer(job: CommJob, kv_heads: int, calls: int = 1,
               builtin: bool = False) -> list[Transfer]:
    """Ring passes of one layer: ``calls`` kernel calls, each forward twice + backward once.

    ``kv_heads`` = ``h``, the KV heads of the block each ring rank holds; ``builtin``: the
    K|V of a pass go as one all-gather (TorchTitan's ring with its default "allgather"
    rotation) instead of ``R-1`` sends.  Ring group: ``R`` ranks ``u`` apart.
    """
    r, u = job.shape.ring, job.shape.ulysses
    if r == 1:
        return []
    sh = job.shape
    block = sh.batch * (sh.seq_len // r) * 2 * kv_heads * sh.model.head_dim * job.act_bytes
    dblock = block * job.acc_bytes / job.act_bytes
    fwd_count = calls if builtin else calls * (r - 1)
    fwd_kind = "all-gather" if builtin else "p2p"
    out = [
        Transfer("k|v", phase, "ring", fwd_kind, calls * (r - 1) * block, fwd_count, r, u)
        for phase in ("forward", "recompute")
    ]
    out += [
        Transfer("k|v", "backward", "ring", fwd_kind, calls * (r - 1) * block, fwd_count, r, u),
        Transfer("dk|dv fp32", "backward", "ring", "p2p", calls * r * dblock, calls * r, r, u),
    ]
    return out


def fsdp_layer(job: CommJob) -> list[Transfer]:
    """FSDP2 traffic of one block: all-gathers of bf16 params, one fp32 reduce-scatter."""
    n = job.shape.world
    if n == 1:
        return []
    p = job.shape.model.block_params
    ag = gather_volume(p * job.param_bytes, n)
    phases = ("forward", "backward", "recompute")[: job.fsdp_all_gathers]
    out = [Transfer("all-gather params", ph, "fsdp", "all-gather", ag, 1, n) for ph in phases]
    out.append(Transfer("reduce-scatter grads", "backward", "fsdp", "reduce-scatter",
                        gather_volume(p * job.grad_bytes, n), 1, n))
    return out


def fsdp_non_layer(job: CommJob) -> list[Transfer]:
    """Embedding (2 all-gathers), norm+output (1, not resharded), one reduce-scatter each."""
    n, shape = job.shape.world, job.shape.model
    if n == 1:
        return []
    out = []
    for name, p, gathers in (("embedding", shape.embedding_params, ("forward", "backward")),
                             ("norm+output", shape.output_params, ("forward",))):
        out += [Transfer(f"all-gather {name}", ph, "fsdp", "all-gather",
                         gather_volume(p * job.param_bytes, n), 1, n) for ph in gathers]
        out.append(Transfer(f"reduce-scatter {name}", "backward", "fsdp", "reduce-scatter",
                            gather_volume(p * job.grad_bytes, n), 1, n))
    return out


def cp_layer(job: CommJob) -> list[Transfer]:
    """Context-parallel traffic of one layer (all-to-all and ring): TorchTitan's ring, UPipe's
    stages (a job with a stage schedule) or Ulysses, each with its ring dimension."""
    shape = job.shape
    if shape.builtin_ring:
        return ring_layer(job, shape.model.n_kv_heads, builtin=job.rotate_method == "allgather")
    sched = shape.schedule
    if sched is None:
        hkv = shape.model.n_kv_heads * shape.rho // shape.ulysses
        return ulysses_layer(job) + _replayed(job, ring_layer(job, hkv))
    return _replayed(job, upipe_layer(job) + ring_layer(job, sched.kappa, calls=sched.n_stages))


def _replayed(job: CommJob, transfers: list[Transfer]) -> list[Transfer]:
    """``transfers`` without the recompute's when the recompute replays the attention."""
    return [t for t in transfers if not (job.keep_attention and t.phase == "recompute")]


def layer_transfers(job: CommJob) -> list[Transfer]:
    """Everything one layer moves in one step: CP traffic + FSDP."""
    return cp_layer(job) + fsdp_layer(job)


def step_transfers(job: CommJob, n_layers: int | None = None) -> list[Transfer]:
    """One step: ``n_layers`` (default: the model's) times a layer, plus non-layer FSDP."""
    n = job.shape.model.n_layers if n_layers is None else n_layers
    return [_scaled(t, n) for t in layer_transfers(job)] + fsdp_non_layer(job)


def _scaled(t: Transfer, n: int) -> Transfer:
    return Transfer(t.name, t.phase, t.category, t.kind, t.bytes * n, t.count * n,
                    t.group_size, t.group_stride)


def totals(transfers: Iterable[Transfer], category: str | None = None,
           phase: str | None = None) -> dict[str, float]:
    """``{"bytes": ..., "count": ...}`` summed over the matching transfers."""
    sel = [t for t in transfers if (category is None or t.category == category)
           and (phase is None or t.phase == phase)]
    return {"bytes": sum(t.bytes for t in sel), "count": sum(t.count for t in sel)}


# ------------------------------------------------------------------------------------- time
def spans_nodes(group_size: int, stride: int, gpus_per_node: int) -> bool:
    """Whether ``group_size`` ranks ``stride`` apart (node-aligned) cross a node boundary."""
    return (group_size - 1) * stride + 1 > gpus_per_node


def transfer_seconds(t: Transfer, net: Network) -> float:
    """``bytes / (bandwidth * efficiency) + count * latency`` on the link of ``t``'s group."""
    nv = net.nvlink_GBps * 1e9 * net.efficiency
    ib = net.ib_GBps * 1e9 * net.efficiency
    latency = t.count * net.latency_us * 1e-6
    if not spans_nodes(t.group_size, t.group_stride, net.gpus_per_node):
        return t.bytes / nv + latency
    if t.kind == "all-to-all":
        # ranks of the group in this rank's node (itself included); the rest are off-node
        on_node = min(t.group_size, max(1, net.gpus_per_node // t.group_stride))
        off = t.bytes * (t.group_size - on_node) / (t.group_size - 1)
        return max((t.bytes - off) / nv, off / ib) + latency
    return t.bytes / ib + latency


def step_comm_seconds(job: CommJob, net: Network | None = None,
                      n_layers: int | None = None) -> dict[str, float]:
    """Seconds of communication in one step, broken down.

    Returns ``{"a2a_s", "ring_s", "fsdp_s", "comm_s", "a2a_bytes", ..., "count"}``:
    per category seconds and bytes (per rank), their totals and the number of collectives.
    """
    net = net or Network()
    transfers = step_transfers(job, n_layers)
    out: dict[str, float] = {}
    for cat in CATEGORIES:
        sel = [t for t in transfers if t.category == cat]
        out[f"{cat}_s"] = sum(transfer_seconds(t, net) for t in sel)
        out[f"{cat}_bytes"] = float(sum(t.bytes for t in sel))
        out[f"{cat}_count"] = float(sum(t.count for t in sel))
    out["comm_s"] = sum(out[f"{c}_s"] for c in CATEGORIES)
    out["bytes"] = sum(out[f"{c}_bytes"] for c in CATEGORIES)
    out["count"] = sum(out[f"{c}_count"] for c in CATEGORIES)
    return out


def exposed_comm_seconds(breakdown: dict[str, float], compute_s: float,
                         overlap: bool | Iterable[str] = False) -> float:
    """Communication left on the critical path.

    ``overlap=False``: all of it (every collective is waited for before the compute that
    needs it).  ``overlap=True``: the ring p2p hides behind compute (each ring step's
    transfer runs during the previous block's attention), ``exposed = comm - min(ring,
    compute)``.  An iterable of categories (e.g. ``("ring", "fsdp")``, FSDP's prefetch)
    hides those instead, up to ``compute_s`` in total.  All-to-alls are never hidden.
    """
    cats = () if overlap is False else ("ring",) if overlap is True else tuple(overlap)
    hidden = min(sum(breakdown[f"{c}_s"] for c in cats), compute_s)
    return breakdown["comm_s"] - hidden


def modeled_tps(seq_len: int, cp_degree: int, compute_s: float, comm_s: float | dict,
                overlap: bool | Iterable[str] = False, batch: int = 1) -> float:
    """Tokens/s per GPU: ``B S / (C (compute + exposed comm))`` (TorchTitan's ``tps``).

    ``comm_s`` is seconds, or the :func:`step_comm_seconds` breakdown (needed for
    ``overlap``; with a plain number ``overlap`` hides nothing).
    """
    if isinstance(comm_s, dict):
        exposed = exposed_comm_seconds(comm_s, compute_s, overlap)
    else:
        exposed = comm_s
    return batch * seq_len / (cp_degree * (compute_s + exposed))


def model_step(job: CommJob, compute_s: float, net: Network | None = None,
               overlap: bool | Iterable[str] = False, n_layers: int | None = None) -> dict[str, float]:
    """Everything for one modeled step: ``compute_s``, ``comm_s`` (+ breakdown),
    ``exposed_comm_s``, ``total_s`` and ``tps`` (per GPU)."""
    br = step_comm_seconds(job, net, n_layers)
    exposed = exposed_comm_seconds(br, compute_s, overlap)
    total = compute_s + exposed
    sh = job.shape
    return {**br, "compute_s": compute_s, "exposed_comm_s": exposed, "total_s": total,
            "tps": sh.batch * sh.seq_len / (sh.cp * total)}


def describe(job: CommJob, net: Network | None = None) -> str:
    """A small human-readable table of one layer's transfers (for reports and debugging)."""
    net = net or Network()
    rows = [f"{'phase':10} {'category':8} {'name':22} {'kind':14} {'count':>6} {'MiB':>10} {'ms':>9}"]
    for t in layer_transfers(job):
        rows.append(f"{t.phase:10} {t.category:8} {t.name:22} {t.kind:14} {t.count:6d} "
                    f"{t.bytes / 2**20:10.2f} {transfer_seconds(t, net) * 1e3:9.3f}")
    return "\n".join(rows)


__all__ = [
    "CATEGORIES",
    "PHASES",
    "CommJob",
    "Network",
    "Transfer",
    "a2a_volume",
    "cp_layer",
    "describe",
    "exposed_comm_seconds",
    "fsdp_layer",
    "fsdp_non_layer",
    "gather_volume",
    "layer_transfers",
    "model_step",
    "modeled_tps",
    "ring_layer",
    "spans_nodes",
    "step_comm_seconds",
    "step_transfers",
    "totals",
    "transfer_seconds",
    "ulysses_layer",
    "upipe_layer",
]
