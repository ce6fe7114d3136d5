"""UPipe forward and backward against a single-device reference (float64), its GQA schedule,
its collective counts and its transient memory."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor.debug import CommDebugMode

from tests.helpers.dist import run_distributed
from tests.helpers.reference import freqs_cis, projected_attention
from torchtitan_upipe import upipe_attention
from torchtitan_upipe.cp.kernels import get_kernel
from torchtitan_upipe.cp.upipe import UPipeSchedule, valid_chunk_heads
from torchtitan_upipe.cp.upipe.functional import upipe_backward, upipe_forward
from torchtitan_upipe.tools.memtrack import LiveTensorTracker

HEADS = [(4, 4), (8, 2), (8, 8), (16, 4), (32, 8)]
S_LOCAL, HEAD_DIM, DIM = 3, 4, 12


def _tensors(b, seq, h, hkv, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, seq, DIM, generator=g, dtype=torch.float64)
    wq = torch.randn(h * HEAD_DIM, DIM, generator=g, dtype=torch.float64) / DIM**0.5
    wk = torch.randn(hkv * HEAD_DIM, DIM, generator=g, dtype=torch.float64) / DIM**0.5
    wv = torch.randn(hkv * HEAD_DIM, DIM, generator=g, dtype=torch.float64) / DIM**0.5
    dout = torch.randn(b, seq, h * HEAD_DIM, generator=g, dtype=torch.float64)
    return x, wq, wk, wv, dout


def _wo(h, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(DIM, h * HEAD_DIM, generator=g, dtype=torch.float64) / (h * HEAD_DIM) ** 0.5


def _check_case(rank, c, group, b, h, hkv, u, kernel="math", fused_wo=False):
    """``fused_wo``: the op applies ``wo`` too (memory.fuse_output_projection); the reference
    is the textbook attention followed by ``@ wo^T``, and ``wo``'s gradient is checked."""
    seq = S_LOCAL * c
    seed = h * 100 + hkv * 10 + u + b
    x, wq, wk, wv, dout = _tensors(b, seq, h, hkv, seed=seed)
    weights = (wq, wk, wv) + ((_wo(h, seed),) if fused_wo else ())
    if fused_wo:
        dout = torch.randn(b, seq, DIM, generator=torch.Generator().manual_seed(seed + 1),
                           dtype=torch.float64)
    freqs = freqs_cis(seq, HEAD_DIM)
    params = [t.clone().requires_grad_() for t in (x, *weights)]
    ref = projected_attention(*params[:4], freqs, h, hkv)
    if fused_wo:
        ref = ref @ params[4].T
    ref.backward(dout)

    sl = slice(rank * S_LOCAL, (rank + 1) * S_LOCAL)
    xl = x[:, sl].clone().requires_grad_()
    ws = [w.clone().requires_grad_() for w in weights]
    out = upipe_attention(
        xl, *ws[:3], freqs[sl], n_heads=h, n_kv_heads=hkv, chunk_heads=u, group=group,
        kernel=kernel, wo=ws[3] if fused_wo else None,
    )
    out.backward(dout[:, sl])
    tol = dict(rtol=1e-10, atol=1e-10)
    msg = f"H={h} H_kv={hkv} C={c} U={u} B={b} wo={fused_wo}"
    torch.testing.assert_close(out, ref.detach()[:, sl], **tol, msg=lambda m: f"{msg} out: {m}")
    torch.testing.assert_close(xl.grad, params[0].grad[:, sl], **tol, msg=lambda m: f"{msg} dx: {m}")
    # weight grads: each rank holds its shard's contribution; their sum is the full gradient
    for name, w_local, w_ref in zip(("dwq", "dwk", "dwv", "dwo"), ws, params[1:]):
        g = w_local.grad.clone()
        if group is not None:
            dist.all_reduce(g, group=group)
        torch.testing.assert_close(g, w_ref.grad, **tol, msg=lambda m: f"{msg} {name}: {m}")


def _grid(rank, c, kernel, fused_wo=False):
    group = dist.group.WORLD if c > 1 else None
    ran = 0
    for h, hkv in HEADS:
        if h % c or (hkv % c and c % hkv):
            continue
        for u in sorted({c, 2 * c, h}):
            if u > h or h % u:
                continue
            for b in (1, 2):
                _check_case(rank, c, group, b, h, hkv, u, kernel, fused_wo)
                ran += 1
    assert ran >= 10, ran


@pytest.mark.parametrize("fused_wo", [False, True], ids=["attention", "fused_wo"])
def test_upipe_single_rank_matches_reference(fused_wo):
    _grid(0, 1, "math", fused_wo)


@pytest.mark.parametrize("fused_wo", [False, True], ids=["attention", "fused_wo"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_upipe_matches_reference(world_size, fused_wo):
    run_distributed(_grid, world_size, "math", fused_wo)


def _sdpa_cases(rank, c):
    group = dist.group.WORLD
    for h, hkv, u in [(8, 2, 2), (16, 4, 4), (8, 8, 8)]:
        _check_case(rank, c, group, 2, h, hkv, u, kernel="sdpa")
    _check_case(rank, c, group, 2, 16, 4, 4, kernel="sdpa", fused_wo=True)


def test_upipe_with_cpu_flash_kernel():
    run_distributed(_sdpa_cases, 2)


def _replicated_kv(rank, c):
    # H_kv < C: KV heads replicated in the computation, gradients summed over replicas
    group = dist.group.WORLD
    for h, hkv, u in [(8, 2, 4), (8, 2, 8), (4, 1, 4), (8, 1, 4)]:
        for fused_wo in (False, True):
            _check_case(rank, c, group, 1, h, hkv, u, fused_wo=fused_wo)


def test_upipe_replicated_kv_heads():
    run_distributed(_replicated_kv, 4)


# ---- the schedule ----------------------------------------------------------------------------


VALID_LAYOUTS = [
    (h, hkv, c)
    for h, hkv in HEADS + [(8, 1), (12, 4), (12, 12), (16, 2)]
    for c in (1, 2, 4, 8)
    if h % c == 0 and (hkv % c == 0 or c % hkv == 0)  # the rest are covered by the error tests
]


@pytest.mark.parametrize("h,hkv,c", VALID_LAYOUTS)
def test_schedule_covers_every_query_head_once_with_its_kv_head(h, hkv, c):
    g = h // hkv
    for u in valid_chunk_heads(h, c):
        sched = UPipeSchedule(h, hkv, c, u)
        seen = []
        for stage in range(sched.n_stages):
            chunk = stage // sched.stages_per_chunk
            kv_per_rank = sched.chunk_kv_heads_per_rank(chunk)
            for r, heads in enumerate(sched.stage_query_heads(stage)):
                assert len(heads) == u // c
                for local, q in enumerate(heads):
                    kv = kv_per_rank[r][local // sched.gamma]
                    assert q // g == kv, (h, hkv, c, u, stage, r, q, kv)
                seen.extend(heads)
        assert sorted(seen) == list(range(h)), (h, hkv, c, u)
        # K/V are sent once per KV chunk, reused by consecutive stages
        assert sched.n_chunks * sched.stages_per_chunk == sched.n_stages


def test_schedule_matches_the_papers_example():
    sched = UPipeSchedule(16, 4, 4, 4)
    assert [sum(sched.stage_query_heads(s), []) for s in range(4)] == [
        [0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]
    ]
    assert sched.n_chunks == 1


def _all_to_alls(fn) -> int:
    with CommDebugMode() as comm_mode:
        result = fn()
    return result, comm_mode.get_comm_counts()[torch.ops.c10d.alltoall_base_]


def _count_collectives(rank, c):
    group = dist.group.WORLD
    kernel = get_kernel("math")
    for h, hkv, u in [(32, 8, 4), (16, 4, 4), (8, 8, 4), (8, 2, 4), (32, 8, 8)]:
        sched = UPipeSchedule(h, hkv, c, u)
        x, wq, wk, wv, dout = _tensors(1, S_LOCAL * c, h, hkv, seed=0)
        x = x[:, :S_LOCAL]
        freqs = freqs_cis(S_LOCAL * c, HEAD_DIM)[:S_LOCAL]
        (out, lse), n = _all_to_alls(
            lambda: upipe_forward(x, wq, wk, wv, freqs, sched, group, kernel, True, 0.5))
        # per KV chunk one fused K|V all-to-all; per stage one Q and one O all-to-all
        assert n == sched.n_chunks + 2 * sched.n_stages, (h, hkv, u, n)
        _, n = _all_to_alls(lambda: upipe_backward(
            dout[:, :S_LOCAL], x, wq, wk, wv, freqs, out, lse, sched, group, kernel, True, 0.5))
        # backward: K|V recompute and dK|dV per chunk; Q, O|dO and dQ per stage
        assert n == 2 * sched.n_chunks + 3 * sched.n_stages, (h, hkv, u, n)
    # the GQA case: 8 stages but only 2 K/V all-to-alls per layer (H_kv / C chunks)
    assert UPipeSchedule(32, 8, c, 4).n_chunks == 8 // c


def test_collective_counts_follow_kv_chunks_not_stages():
    run_distributed(_count_collectives, 4)


# ---- memory ----------------------------------------------------------------------------------


def _transient_peaks(u, h=32, hkv=8, seq=512, b=1):
    """Peak bytes the forward and the backward allocate beyond their inputs and outputs (C=1)."""
    d, dim = 16, 64
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, seq, dim, generator=g)
    wq, wk, wv = (torch.randn(n * d, dim, generator=g) * 0.1 for n in (h, hkv, hkv))
    freqs = freqs_cis(seq, d)
    sched = UPipeSchedule(h, hkv, 1, u)
    kernel = get_kernel("sdpa")
    with LiveTensorTracker() as fwd:
        out, lse = upipe_forward(x, wq, wk, wv, freqs, sched, None, kernel, True, d**-0.5)
    dout = torch.randn_like(out)
    with LiveTensorTracker() as bwd:
        grads = upipe_backward(dout, x, wq, wk, wv, freqs, out, lse, sched, None, kernel, True, d**-0.5)[:4]
    out_bytes = out.nbytes + lse.nbytes
    grad_bytes = sum(t.nbytes for t in grads)
    return fwd.peak_bytes - out_bytes, bwd.peak_bytes - grad_bytes, out.numel() * out.element_size()


def test_transient_memory_falls_with_chunk_heads():
    h = 32
    peaks = {u: _transient_peaks(u, h=h) for u in (1, 2, 32)}
    fwd = {u: p[0] for u, p in peaks.items()}
    bwd = {u: p[1] for u, p in peaks.items()}
    assert fwd[1] < fwd[2] < fwd[32], fwd
    assert bwd[1] < bwd[2] < bwd[32], bwd
    # U = C (=1 here) costs about U/H of U = H, plus a small constant share
    assert fwd[1] <= (1 / h + 0.1) * fwd[32], fwd
    assert bwd[1] <= (1 / h + 0.25) * bwd[32], bwd


# ---- errors ----------------------------------------------------------------------------------


def test_bad_chunk_heads_raise_with_the_option_name():
    with pytest.raises(ValueError, match="upipe_chunk_heads=3 must be a positive multiple of the all-to-all degree 2"):
        UPipeSchedule(8, 8, 2, 3)
    with pytest.raises(ValueError, match=r"upipe_chunk_heads=12 must divide n_heads=16.*valid: \[4, 8, 16\]"):
        UPipeSchedule(16, 4, 4, 12)
    with pytest.raises(ValueError, match="incompatible"):
        UPipeSchedule(12, 3, 2, 2)
    with pytest.raises(ValueError, match="freqs_cis"):
        x, wq, wk, wv, _ = _tensors(1, 4, 4, 4, 0)
        upipe_attention(x, wq, wk, wv, freqs_cis(3, HEAD_DIM), n_heads=4, n_kv_heads=4)


@pytest.mark.parametrize("fused_wo", [False, True], ids=["attention", "fused_wo"])
def test_custom_op_is_opaque_to_torch_compile(fused_wo):
    """fullgraph compile traces the op as one node; forward and backward stay exact."""
    x, wq, wk, wv, dout = _tensors(1, 6, 8, 2, 0)
    leaves = (x, wq, wk, wv) + ((_wo(8, 0),) if fused_wo else ())
    if fused_wo:
        dout = torch.randn(1, 6, DIM, dtype=dout.dtype)
    freqs = freqs_cis(6, HEAD_DIM)

    def f(x, wq, wk, wv, wo=None):
        return upipe_attention(x, wq, wk, wv, freqs, n_heads=8, n_kv_heads=2, chunk_heads=2,
                               kernel="math", wo=wo)

    compiled = [t.clone().requires_grad_() for t in leaves]
    eager = [t.clone().requires_grad_() for t in leaves]
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(*compiled)
    out.backward(dout)
    ref = f(*eager)
    ref.backward(dout)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


@pytest.mark.parametrize("fused_wo", [False, True], ids=["attention", "fused_wo"])
def test_inline_ops_give_the_custom_ops_values_and_gradients(fused_wo):
    """The estimator's inline path (no custom-op boundary) computes exactly what the op does."""
    x, wq, wk, wv, dout = _tensors(2, 6, 8, 2, 1)
    tensors = (x, wq, wk, wv) + ((_wo(8, 1),) if fused_wo else ())
    if fused_wo:
        dout = torch.randn(2, 6, DIM, dtype=dout.dtype)
    freqs = freqs_cis(6, HEAD_DIM)
    results = []
    for inline in (False, True):
        leaves = [t.clone().requires_grad_() for t in tensors]
        out = upipe_attention(*leaves[:4], freqs, n_heads=8, n_kv_heads=2, chunk_heads=4,
                              kernel="math", inline=inline, wo=leaves[4] if fused_wo else None)
        out.backward(dout)
        results.append([out.detach()] + [t.grad for t in leaves])
    for op, inline in zip(*results):
        assert torch.equal(op, inline)


def test_bf16_gradients_are_as_accurate_as_ulysses():
    """dx accumulates in bf16 across stages (memory); even at U = 1 (34 roundings per layer) its
    error against float64 stays within 1.5x that of Ulysses' plain autograd in bf16."""
    from torchtitan.models.llama3.model.model import apply_rotary_emb

    from torchtitan_upipe import ulysses_attention

    b, s, h, hkv, d, dim = 1, 256, 32, 8, 16, 128
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, s, dim, generator=g, dtype=torch.float64)
    ws = [torch.randn(n * d, dim, generator=g, dtype=torch.float64) / dim**0.5 for n in (h, hkv, hkv)]
    dout = torch.randn(b, s, h * d, generator=g, dtype=torch.float64)
    freqs = freqs_cis(s, d)

    def ulysses(x_, wq, wk, wv):
        q, k = apply_rotary_emb((x_ @ wq.T).view(b, s, h, d), (x_ @ wk.T).view(b, s, hkv, d), freqs)
        return ulysses_attention(q, k, (x_ @ wv.T).view(b, s, hkv, d), group=None, kernel="sdpa").flatten(2)

    def upipe(u):
        return lambda x_, wq, wk, wv: upipe_attention(
            x_, wq, wk, wv, freqs, n_heads=h, n_kv_heads=hkv, chunk_heads=u, kernel="sdpa")

    def grads(fn, dtype):
        leaves = [t.to(dtype).detach().requires_grad_() for t in (x, *ws)]
        fn(*leaves).backward(dout.to(dtype))
        return [t.grad.double() for t in leaves]

    exact = grads(lambda *a: projected_attention(*a, freqs, h, hkv), torch.float64)
    err = lambda got: [((a - r).norm() / r.norm()).item() for a, r in zip(got, exact)]
    baseline = err(grads(ulysses, torch.bfloat16))
    for u in (1, 4, 32):
        for name, e, e0 in zip(("dx", "dwq", "dwk", "dwv"), err(grads(upipe(u), torch.bfloat16)), baseline):
            assert e <= 1.5 * e0, (u, name, e, e0)


def test_bf16_fused_output_projection_is_as_accurate_as_wo_after_the_op():
    """memory.fuse_output_projection in bf16: the output is wo's own GEMM (bit for bit), and
    every gradient (x and the four weights) is within 1.1x of the error, against float64, of
    the op followed by autograd's ``nn.Linear`` wo, at U = 1 (8 stages' columns), 4 and 8."""
    b, s, h, hkv, d, dim = 1, 256, 8, 2, 16, 64
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, s, dim, generator=g, dtype=torch.float64)
    ws = [torch.randn(n * d, dim, generator=g, dtype=torch.float64) / dim**0.5 for n in (h, hkv, hkv)]
    wo = torch.randn(dim, h * d, generator=g, dtype=torch.float64) / (h * d) ** 0.5
    dy = torch.randn(b, s, dim, generator=g, dtype=torch.float64)
    freqs = freqs_cis(s, d)

    def run(u, fused, dtype):
        leaves = [t.to(dtype).detach().requires_grad_() for t in (x, *ws, wo)]
        kw = dict(n_heads=h, n_kv_heads=hkv, chunk_heads=u, kernel="sdpa")
        if fused:
            y = upipe_attention(*leaves[:4], freqs, wo=leaves[4], **kw)
        else:
            y = torch.nn.functional.linear(upipe_attention(*leaves[:4], freqs, **kw), leaves[4])
        y.backward(dy.to(dtype))
        return y.detach(), [t.grad.double() for t in leaves]

    exact = run(h, False, torch.float64)[1]
    err = lambda got: [((a - r).norm() / r.norm()).item() for a, r in zip(got, exact)]
    for u in (1, 4, 8):
        y_fused, fused = run(u, True, torch.bfloat16)
        y_after, after = run(u, False, torch.bfloat16)
        assert torch.equal(y_fused, y_after), u
        for name, e, e0 in zip(("dx", "dwq", "dwk", "dwv", "dwo"), err(fused), err(after)):
            assert e <= 1.1 * e0, (u, name, e, e0)
