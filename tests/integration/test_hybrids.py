"""Ulysses x ring hybrids (usp, UPipe x ring) on 4 gloo ranks as 2x2, 4x1 and 1x4.

Every case builds the full problem on every rank, shards it with the production sharder
(zigzag over the ring composed with the all-to-all), runs the hybrid, and compares the output
and the gradients of the inputs and weights with a single-device reference in float64.
"""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from torchtitan_upipe import ulysses_attention, upipe_attention
from torchtitan_upipe.cp.kernels import get_kernel
from torchtitan_upipe.titan.groups import build_cp_groups
from torchtitan_upipe.cp.ring import RingKernel
from torchtitan_upipe.titan.sharding import sharder_for
from tests.helpers.dist import run_distributed
from tests.helpers.reference import attention, freqs_cis, projected_attention
from tests.cp.test_upipe import HEAD_DIM, _tensors

SEQ = 16  # divisible by 2 * C = 8
TOL = dict(rtol=1e-10, atol=1e-10)


def _usp_case(groups, sharder, b, h, hkv):
    idx = sharder.indices(SEQ)
    torch.manual_seed(h * 10 + hkv + b)
    q = torch.randn(b, SEQ, h, HEAD_DIM, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, SEQ, hkv, HEAD_DIM, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, SEQ, hkv, HEAD_DIM, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(b, SEQ, h, HEAD_DIM, dtype=torch.float64)
    attention(q, k, v).backward(dout)
    ref = attention(q.detach(), k.detach(), v.detach())
    ql, kl, vl = (t.detach()[:, idx].clone().requires_grad_() for t in (q, k, v))
    kernel = get_kernel("math")
    if groups.ring is not None:
        kernel = RingKernel(groups.ring, kernel)
    out = ulysses_attention(ql, kl, vl, group=groups.ulysses, kernel=kernel)
    out.backward(dout[:, idx])
    msg = f"usp R={groups.ring_degree} u={groups.ulysses_degree} H={h} H_kv={hkv} B={b}"
    torch.testing.assert_close(out, ref[:, idx], **TOL, msg=lambda m: f"{msg} out: {m}")
    for name, local, full in (("dq", ql, q), ("dk", kl, k), ("dv", vl, v)):
        torch.testing.assert_close(local.grad, full.grad[:, idx], **TOL, msg=lambda m: f"{msg} {name}: {m}")


def _upipe_case(groups, sharder, b, h, hkv, u_heads):
    idx = sharder.indices(SEQ)
    x, wq, wk, wv, dout = _tensors(b, SEQ, h, hkv, seed=h * 7 + hkv + u_heads)
    freqs = freqs_cis(SEQ, HEAD_DIM)
    params = [t.clone().requires_grad_() for t in (x, wq, wk, wv)]
    ref = projected_attention(*params, freqs, h, hkv)
    ref.backward(dout)
    xl = x[:, idx].clone().requires_grad_()
    ws = [w.clone().requires_grad_() for w in (wq, wk, wv)]
    out = upipe_attention(xl, *ws, freqs[idx], n_heads=h, n_kv_heads=hkv, chunk_heads=u_heads,
                          group=groups.ulysses, ring_group=groups.ring, kernel="math")
    out.backward(dout[:, idx])
    msg = f"upipe R={groups.ring_degree} u={groups.ulysses_degree} H={h} H_kv={hkv} U={u_heads} B={b}"
    torch.testing.assert_close(out, ref.detach()[:, idx], **TOL, msg=lambda m: f"{msg} out: {m}")
    torch.testing.assert_close(xl.grad, params[0].grad[:, idx], **TOL, msg=lambda m: f"{msg} dx: {m}")
    for name, w_local, w_ref in zip(("dwq", "dwk", "dwv"), ws, params[1:]):
        g = w_local.grad.clone()
        dist.all_reduce(g)  # every CP rank holds its tokens' share of the weight gradient
        torch.testing.assert_close(g, w_ref.grad, **TOL, msg=lambda m: f"{msg} {name}: {m}")


# (ring R, ulysses u) -> usp cases (H, H_kv, B) and upipe cases (H, H_kv, U, B)
GRID = {
    (2, 2): ([(4, 4, 1), (8, 2, 2), (6, 2, 1), (4, 1, 1)],
             [(8, 2, 2, 1), (6, 2, 2, 2), (8, 8, 4, 1), (4, 1, 2, 1), (8, 2, 8, 1)]),
    (4, 1): ([(4, 4, 2), (8, 2, 1)], [(8, 2, 1, 1), (6, 2, 2, 1), (4, 4, 4, 2)]),
    (1, 4): ([(4, 4, 1), (8, 2, 2)], [(12, 4, 4, 1), (8, 2, 4, 1), (8, 8, 8, 2)]),
}


def _grid(rank, world):
    cp_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    stages_seen = set()
    for (r, u), (usp_cases, upipe_cases) in GRID.items():
        groups = build_cp_groups(cp_mesh, u)
        assert (groups.ring_degree, groups.ulysses_degree) == (r, u)
        assert groups.ring_rank * u + groups.ulysses_rank == rank
        sharder = sharder_for(groups)
        for h, hkv, b in usp_cases:
            _usp_case(groups, sharder, b, h, hkv)
        for h, hkv, u_heads, b in upipe_cases:
            _upipe_case(groups, sharder, b, h, hkv, u_heads)
            stages_seen.add(h // u_heads)
    assert any(s % 2 == 1 and s > 1 for s in stages_seen), stages_seen  # odd numbers of stages


def test_hybrids_match_single_device():
    run_distributed(_grid, 4)
