"""ulysses_attention forward and backward against single-device causal attention (float64)."""

import pytest
import torch
import torch.distributed as dist

from torchtitan_upipe import ulysses_attention
from tests.helpers.dist import run_distributed
from tests.helpers.reference import attention, attention_case

# (H, H_kv): MHA, H_kv divisible by C, and C divisible by H_kv (replicated KV heads)
HEADS = [(4, 4), (8, 8), (8, 4), (8, 2), (16, 4), (4, 1), (8, 1)]


def _case(rank, c, b, h, hkv, kernel, causal=True):
    s_local, d = 5, 8
    seq = s_local * c
    q, k, v, dout, ref = attention_case(b, seq, h, hkv, d, causal=causal, seed=1234 + h * 7 + hkv)

    sl = slice(rank * s_local, (rank + 1) * s_local)
    ql, kl, vl = (t.detach()[:, sl].clone().requires_grad_() for t in (q, k, v))
    out = ulysses_attention(ql, kl, vl, group=dist.group.WORLD, causal=causal, kernel=kernel)
    out.backward(dout[:, sl])
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, ref.detach()[:, sl], **tol)
    torch.testing.assert_close(ql.grad, q.grad[:, sl], **tol)
    torch.testing.assert_close(kl.grad, k.grad[:, sl], **tol)
    torch.testing.assert_close(vl.grad, v.grad[:, sl], **tol)


def _grid(rank, c, kernel):
    ran = 0
    for h, hkv in HEADS:
        if h % c or (hkv % c and c % hkv):
            continue
        for b in (1, 2):
            _case(rank, c, b, h, hkv, kernel)
            ran += 1
    _case(rank, c, 1, 8, 2, kernel, causal=False)
    assert ran >= 5, ran


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("kernel", ["math", "sdpa"])
def test_ulysses_matches_single_device(world_size, kernel):
    run_distributed(_grid, world_size, kernel)


def _errors(rank, c):
    g = dist.group.WORLD
    q = torch.randn(1, 2, 6, 4)
    kv = torch.randn(1, 2, 6, 4)
    with pytest.raises(ValueError, match="not divisible by the all-to-all degree"):
        ulysses_attention(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), group=g)
    # H_kv = 3 with C = 2: neither divides the other
    with pytest.raises(ValueError, match="incompatible"):
        ulysses_attention(q, kv[:, :, :3], kv[:, :, :3], group=g)


def test_ulysses_rejects_bad_head_counts():
    run_distributed(_errors, 2)


def test_ulysses_without_group_is_plain_attention():
    torch.manual_seed(0)
    q = torch.randn(2, 6, 4, 8, dtype=torch.float64)
    k = torch.randn(2, 6, 2, 8, dtype=torch.float64)
    v = torch.randn(2, 6, 2, 8, dtype=torch.float64)
    torch.testing.assert_close(
        ulysses_attention(q, k, v, group=None, kernel="math"), attention(q, k, v), rtol=1e-12, atol=1e-12
    )
