"""ring_attention (zigzag) forward and backward against single-device attention (float64)."""

import itertools

import pytest
import torch
import torch.distributed as dist

from torchtitan_upipe.cp.ring import merge, ring_attention
from torchtitan_upipe.cp.zigzag import zigzag_shard
from tests.helpers.comm_trace import CollectiveTrace
from tests.helpers.dist import run_distributed
from tests.helpers.reference import attention_case

HEADS = [(4, 4), (8, 2), (4, 1)]
GRID = list(itertools.product(HEADS, (1, 2), (True, False), ("math", "sdpa")))
TOL = dict(rtol=1e-10, atol=1e-10)


def _case(ring_rank, degree, group, b, h, hkv, causal, kernel, chunk=3, d=8):
    seq = 2 * degree * chunk
    q, k, v, dout, ref = attention_case(b, seq, h, hkv, d, causal=causal,
                                        seed=1000 + 31 * h + 7 * hkv + b)

    def shard(t):
        return zigzag_shard(t.detach(), degree, ring_rank)

    ql, kl, vl = (shard(t).requires_grad_() for t in (q, k, v))
    out = ring_attention(ql, kl, vl, group=group, causal=causal, kernel=kernel)
    out.backward(shard(dout))
    what = f"R={degree} b={b} h={h} hkv={hkv} causal={causal} kernel={kernel}"
    for name, got, want in (
        ("out", out, ref), ("dq", ql.grad, q.grad), ("dk", kl.grad, k.grad), ("dv", vl.grad, v.grad)
    ):
        torch.testing.assert_close(got, shard(want), **TOL, msg=lambda m: f"{name} {what}: {m}")


def _sends(fn) -> int:
    """p2p sends ``fn`` makes (each ring step sends one buffer to the next rank)."""
    with CollectiveTrace() as trace:
        fn()
    return sum(kind == "send" for kind, _ in trace.sent)


def _p2p_counts(rank, degree, group):
    q = zigzag_shard(torch.randn(1, 4 * degree, 4, 8, dtype=torch.float64), degree, rank)
    kv = zigzag_shard(torch.randn(1, 4 * degree, 2, 8, dtype=torch.float64), degree, rank)
    q.requires_grad_()
    outs = []
    sends = _sends(lambda: outs.append(ring_attention(q, kv, kv, group=group, kernel="math")))
    assert sends == degree - 1, (sends, degree)
    sends = _sends(lambda: outs[0].sum().backward())
    assert sends == 2 * degree - 1, (sends, degree)


def _world(rank, world_size):
    group = dist.group.WORLD
    for (h, hkv), b, causal, kernel in GRID:
        _case(rank, world_size, group, b, h, hkv, causal, kernel)
    _p2p_counts(rank, world_size, group)
    if world_size == 4:
        # rings over strided sub-groups {0, 2} and {1, 3}: group-local ranks != global ranks
        groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        sub = groups[rank % 2]
        ring_rank = dist.get_rank(sub)
        for kernel in ("math", "sdpa"):
            _case(ring_rank, 2, sub, 2, 8, 2, True, kernel)
        _p2p_counts(ring_rank, 2, sub)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ring_matches_single_device(world_size):
    run_distributed(_world, world_size)


def test_ring_without_group_is_plain_attention():
    for (h, hkv), b, causal, kernel in GRID:
        _case(0, 1, None, b, h, hkv, causal, kernel)


def test_merge_handles_empty_rows():
    torch.manual_seed(0)
    out = torch.randn(1, 3, 2, 4, dtype=torch.float64)
    blk = torch.randn(1, 3, 2, 4, dtype=torch.float64)
    lse = torch.randn(1, 2, 3, dtype=torch.float64)
    blse = torch.randn(1, 2, 3, dtype=torch.float64)
    ninf = float("-inf")
    lse[0, 0, 0] = ninf  # state empty: take the block
    out[0, 0, 0] = float("nan")
    blse[0, 1, 1] = ninf  # block empty: keep the state
    blk[0, 1, 1] = float("nan")
    lse[0, 0, 2] = blse[0, 0, 2] = ninf  # both empty
    out[0, 2, 0] = 0.0
    m_out, m_lse = merge(out, lse, blk, blse)
    w_state = torch.exp(lse - torch.logaddexp(lse, blse)).transpose(1, 2).unsqueeze(-1)
    w_state = torch.nan_to_num(w_state)
    expect = w_state * torch.nan_to_num(out) + (1 - w_state) * torch.nan_to_num(blk)
    expect[0, 0, 0] = blk[0, 0, 0]
    expect[0, 1, 1] = out[0, 1, 1]
    expect[0, 2, 0] = out[0, 2, 0]
    torch.testing.assert_close(m_out, expect, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m_lse, torch.logaddexp(lse, blse), rtol=1e-12, atol=1e-12)
    assert not m_out.isnan().any()
