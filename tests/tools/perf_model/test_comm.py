"""The communication model (torchtitan_upipe.tools.perf_model.comm): volumes by hand, its
structural claims, and the bytes the real ops put on the wire (gloo, float64)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.helpers.comm_trace import CollectiveTrace
from tests.helpers.dist import run_distributed
from torchtitan_upipe.cp.kernels import get_kernel
from torchtitan_upipe.cp.ring import ring_backward, ring_forward
from torchtitan_upipe.cp.ulysses import ulysses_attention
from torchtitan_upipe.cp.upipe import UPipeSchedule
from torchtitan_upipe.cp.upipe.functional import upipe_backward, upipe_forward
from torchtitan_upipe.titan.shape import JobShape, ModelShape
from torchtitan_upipe.tools.perf_model import comm as cm


def _model(h=4, hkv=2, d=2, dim=8, ffn=0, layers=1):
    return ModelShape(dim=dim, n_layers=layers, n_heads=h, n_kv_heads=hkv, head_dim=d,
                      ffn_hidden=ffn, vocab=1)


def _job(style, seq, cp, ngpu=0, ulysses_degree=0, chunk_heads=0, model=None, ffn=0, **kw):
    """A CommJob of ``model`` (default: H=4, H_kv=2, D=2, dim=8, one layer, MLP width ``ffn``)."""
    shape = JobShape.build(model or _model(ffn=ffn), seq, style, cp, ulysses_degree, chunk_heads,
                           world=ngpu)
    return cm.CommJob(shape, **kw)


def _bytes(transfers, phase=None, category=None):
    return cm.totals(transfers, category, phase)["bytes"]


def _count(transfers, phase=None, category=None):
    return cm.totals(transfers, category, phase)["count"]


# ------------------------------------------------------------------------- comm model: by hand
def test_ulysses_volumes_by_hand():
    # H=4, H_kv=2, D=2, B=1, S=8, C=2, bf16: s = 4 local tokens
    # q: 4*4*2*2 = 64 B local, sent 64/2 = 32; k|v: 4*(2*2)*2*2 = 64 -> 32; o 32
    t = cm.ulysses_layer(_job("ulysses", 8, 2))
    assert _bytes(t, "forward") == 96 and _count(t, "forward") == 3
    assert _bytes(t, "recompute") == 96 and _count(t, "recompute") == 3
    assert _bytes(t, "backward") == 96 and _count(t, "backward") == 3  # do, dq, dk|dv
    assert _bytes(t) == 288


def test_upipe_volumes_by_hand():
    # U=2, C=2: m=1, g=2, gamma=1, kappa=1, tau=2 -> 2 stages, 1 KV chunk of 2 heads
    job = _job("upipe", 8, 2, chunk_heads=2)
    sched = job.shape.schedule
    assert (sched.n_stages, sched.n_chunks, sched.chunk_kv_heads) == (2, 1, 2)
    t = cm.upipe_layer(job)
    # forward: k|v 4*(2*2)*2*2/2 = 32; per stage q 4*2*2*2/2 = 16 (x2), o 16 (x2)
    assert _bytes(t, "forward") == 96 and _count(t, "forward") == 1 + 2 * 2
    # backward: k|v 32 + q 32 + o|do 64 + dq 32 + dk|dv 32
    assert _bytes(t, "backward") == 192 and _count(t, "backward") == 2 * 1 + 3 * 2


def test_ring_volumes_by_hand():
    # zigzag ring of R=2 (usp, u=1): K|V block = 1 * 8/2 tokens * 2 * 2 heads * 2 * 2 B = 64
    t = cm.cp_layer(_job("usp", 8, 2, ulysses_degree=1))
    assert _bytes(t, "forward", "a2a") == 0
    assert _bytes(t, "forward") == 64 and _count(t, "forward") == 1
    assert _bytes(t, "recompute") == 64
    # backward: R-1 = 1 K|V send + R = 2 fp32 dK|dV sends of 128 B
    assert _bytes(t, "backward") == 64 + 2 * 128 and _count(t, "backward") == 1 + 2
    # TorchTitan's ring: same bytes, the forward K|V as one all-gather
    builtin = cm.cp_layer(_job("ring", 8, 2))
    assert _bytes(builtin) == _bytes(t)
    assert {x.kind for x in builtin if x.phase == "forward"} == {"all-gather"}
    a2a_rot = cm.cp_layer(_job("ring", 8, 2, rotate_method="alltoall"))
    assert _bytes(a2a_rot) == _bytes(t) and _count(a2a_rot) == _count(t)


def test_fsdp_volumes_by_hand():
    job = _job("ulysses", 16, 8, ngpu=8, ffn=33)
    assert job.shape.model.block_params == 1000
    t = cm.fsdp_layer(job)
    # two bf16 all-gathers (FSDP2 reuses the pre-backward unshard for the recompute)
    assert _bytes(t, category="fsdp") == 2 * 2000 * 7 / 8 + 4000 * 7 / 8
    assert _count(t) == 3
    three = cm.fsdp_layer(_job("ulysses", 16, 8, ngpu=8, ffn=33, fsdp_all_gathers=3))
    assert _bytes(three) == 3 * 2000 * 7 / 8 + 4000 * 7 / 8


# ---------------------------------------------------------------------- comm model: properties
CASES = [(32, 8, 8, 8), (32, 8, 8, 16), (32, 8, 8, 32), (16, 4, 4, 4), (8, 2, 4, 4), (64, 8, 8, 8)]


@pytest.mark.parametrize("h,hkv,c,u", CASES)
def test_upipe_forward_volume_equals_ulysses(h, hkv, c, u):
    model = _model(h, hkv, 128, 4096)
    uly = cm.ulysses_layer(_job("ulysses", 1024 * c, c, model=model))
    up = cm.upipe_layer(_job("upipe", 1024 * c, c, chunk_heads=u, model=model))
    sched = UPipeSchedule(h, hkv, c, u)
    # K/V go once per chunk, so the forward moves exactly Ulysses' bytes ...
    assert _bytes(up, "forward") == pytest.approx(_bytes(uly, "forward"))
    # ... in n_chunks + 2 n_stages collectives instead of 3
    assert _count(up, "forward") == sched.n_chunks + 2 * sched.n_stages
    assert _count(up, "backward") == 2 * sched.n_chunks + 3 * sched.n_stages
    # full AC: UPipe re-sends K|V and O in the backward, 8 (H + H_kv') vs 6 (H + H_kv')
    assert _bytes(up) == pytest.approx(_bytes(uly) * 8 / 6)


def test_llama3_8b_shape_and_counts():
    shape = ModelShape.from_flavor("8B")
    assert (shape.n_heads, shape.n_kv_heads, shape.head_dim) == (32, 8, 128)
    assert shape.block_params == 4096 * (32 + 16) * 128 + 32 * 128 * 4096 + 3 * 4096 * 14336 + 2 * 4096
    t = cm.upipe_layer(_job("upipe", 128 * 1024, 8, chunk_heads=8, model=shape))
    assert _count(t, "forward") == 1 + 2 * 4  # 1 KV chunk (H_kv = C), 4 stages of 8 heads


def test_step_seconds_links_and_tps():
    net = cm.Network(nvlink_GBps=100.0, ib_GBps=10.0, efficiency=0.5, latency_us=10.0)
    shape = _model(32, 8, 128, 4096, layers=4)
    job = _job("ulysses", 2**16, 8, ngpu=8, model=shape)
    br = cm.step_comm_seconds(job, net)
    tr = cm.step_transfers(job)
    a2a = [t for t in tr if t.category == "a2a"]
    expect = sum(t.bytes for t in a2a) / 50e9 + sum(t.count for t in a2a) * 10e-6
    assert br["a2a_s"] == pytest.approx(expect)
    assert br["comm_s"] == pytest.approx(br["a2a_s"] + br["ring_s"] + br["fsdp_s"])
    assert br["count"] == 4 * (9 + 3) + 5  # + embedding (2 AG, 1 RS) and norm+output (1 AG, 1 RS)
    # usp over 16 GPUs: the ring group (ranks 8 apart) crosses nodes -> InfiniBand
    usp = _job("usp", 2**16, 16, ngpu=16, ulysses_degree=8, model=shape)
    ring = [t for t in cm.step_transfers(usp) if t.category == "ring"]
    assert all(cm.spans_nodes(t.group_size, t.group_stride, 8) for t in ring)
    assert cm.step_comm_seconds(usp, net)["ring_s"] == pytest.approx(
        sum(t.bytes for t in ring) / 5e9 + sum(t.count for t in ring) * 10e-6)
    # tokens/s per GPU = S / (C (compute + exposed comm)); overlap hides the ring only
    assert cm.modeled_tps(2**16, 8, 1.0, 0.25) == pytest.approx(2**16 / (8 * 1.25))
    br = {"a2a_s": 0.1, "ring_s": 0.3, "fsdp_s": 0.2, "comm_s": 0.6}
    assert cm.modeled_tps(1000, 2, 1.0, br) == pytest.approx(1000 / (2 * 1.6))
    assert cm.modeled_tps(1000, 2, 1.0, br, overlap=True) == pytest.approx(1000 / (2 * 1.3))
    assert cm.modeled_tps(1000, 2, 0.2, br, overlap=("ring", "fsdp")) == pytest.approx(1000 / (2 * 0.6))
    step = cm.model_step(job, 2.0, net)
    assert step["total_s"] == pytest.approx(2.0 + step["comm_s"])


# ------------------------------------------------------- comm model against the code's traffic
S_LOCAL, HD, DIM = 4, 4, 8


def _traffic(rank, c):
    """Count the bytes the real ops put on the wire and compare with the model (float64)."""
    g = torch.Generator().manual_seed(rank)
    kernel = get_kernel("math")
    trace = CollectiveTrace()

    def sent(fn):
        trace.clear()
        with trace:
            result = fn()
        return result, trace.total()

    group = dist.group.WORLD
    for h, hkv, u in [(4, 2, 2), (8, 2, 2), (8, 4, 4)]:
        shape = _model(h, hkv, HD, DIM)
        x = torch.randn(1, S_LOCAL, DIM, generator=g, dtype=torch.float64)
        wq, wk, wv = (torch.randn(n * HD, DIM, generator=g, dtype=torch.float64) for n in (h, hkv, hkv))
        freqs = torch.polar(torch.ones(S_LOCAL, HD // 2, dtype=torch.float64),
                            torch.rand(S_LOCAL, HD // 2, generator=g, dtype=torch.float64))
        model = cm.upipe_layer(_job("upipe", S_LOCAL * c, c, chunk_heads=u, act_bytes=8, model=shape))
        sched = UPipeSchedule(h, hkv, c, u)
        (out, lse), got = sent(lambda: upipe_forward(x, wq, wk, wv, freqs, sched, group, kernel, True, 0.5))
        assert got == (_bytes(model, "forward"), _count(model, "forward"))
        _, got = sent(lambda: upipe_backward(torch.randn_like(out), x, wq, wk, wv, freqs, out, lse, sched,
                                             group, kernel, True, 0.5))
        assert got == (_bytes(model, "backward"), _count(model, "backward"))

        model = cm.ulysses_layer(_job("ulysses", S_LOCAL * c, c, act_bytes=8, model=shape))
        q = torch.randn(1, S_LOCAL, h, HD, dtype=torch.float64, generator=g, requires_grad=True)
        k, v = (torch.randn(1, S_LOCAL, hkv, HD, dtype=torch.float64, generator=g, requires_grad=True)
                for _ in range(2))
        o, got = sent(lambda: ulysses_attention(q, k, v, group=group, kernel=kernel))
        assert got == (_bytes(model, "forward"), _count(model, "forward"))
        _, got = sent(lambda: o.backward(torch.randn_like(o)))
        assert got == (_bytes(model, "backward"), _count(model, "backward"))

        # zigzag ring over all c ranks (usp with u = 1); one forward and one backward pass
        model = cm.cp_layer(_job("usp", S_LOCAL * c, c, ulysses_degree=1, act_bytes=8, acc_bytes=8,
                                 model=shape))
        q, k, v = (t.detach() for t in (q, k, v))
        (out, lse), got = sent(lambda: ring_forward(group, q, k, v, kernel, True, 0.5))
        assert got == (_bytes(model, "forward"), _count(model, "forward"))
        _, got = sent(lambda: ring_backward(group, torch.randn_like(out), q, k, v, out, lse, kernel, True, 0.5))
        assert got == (_bytes(model, "backward"), _count(model, "backward"))


def test_model_matches_the_bytes_the_ops_send():
    run_distributed(_traffic, 2)
