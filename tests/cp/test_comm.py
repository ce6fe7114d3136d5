"""The differentiable sequence<->head all-to-all: layout, round trip and gradients."""

import pytest
import torch

from torchtitan_upipe.cp.comm import (
    all_to_all_head_to_seq,
    all_to_all_seq_to_head,
    group_rank,
    pack_pair,
    pair_head_to_seq,
    pair_seq_to_head,
    unpack_pair,
)
from tests.helpers.dist import run_distributed

import torch.distributed as dist


def _check_all_to_all(rank, world_size):
    group = dist.group.WORLD
    for b, h, d in [(1, world_size, 3), (2, 2 * world_size, 4)]:
        s_local = 3
        seq = s_local * world_size
        torch.manual_seed(0)
        full = torch.randn(b, seq, h, d, dtype=torch.float64)
        local = full[:, rank * s_local : (rank + 1) * s_local].clone().requires_grad_()

        head = all_to_all_seq_to_head(local, group)
        # layout: rank r holds heads [r*h/C, (r+1)*h/C) of the whole sequence
        hc = h // world_size
        torch.testing.assert_close(head, full[:, :, rank * hc : (rank + 1) * hc], rtol=0, atol=0)

        back = all_to_all_head_to_seq(head, group)
        torch.testing.assert_close(back, local, rtol=0, atol=0)

        # gradient of a linear functional: d/dlocal sum(W * head) must be W routed back
        torch.manual_seed(1)
        w_full = torch.randn(b, seq, h, d, dtype=torch.float64)
        (head * w_full[:, :, rank * hc : (rank + 1) * hc]).sum().backward()
        torch.testing.assert_close(
            local.grad, w_full[:, rank * s_local : (rank + 1) * s_local], rtol=0, atol=0
        )

        # and the reverse direction's gradient
        hs = full[:, :, rank * hc : (rank + 1) * hc].clone().requires_grad_()
        seq_sharded = all_to_all_head_to_seq(hs, group)
        torch.testing.assert_close(
            seq_sharded, full[:, rank * s_local : (rank + 1) * s_local], rtol=0, atol=0
        )
        (seq_sharded * w_full[:, rank * s_local : (rank + 1) * s_local]).sum().backward()
        torch.testing.assert_close(hs.grad, w_full[:, :, rank * hc : (rank + 1) * hc], rtol=0, atol=0)
    assert group_rank(group) == rank


@pytest.mark.parametrize("world_size", [2, 4])
def test_all_to_all_round_trip_and_gradient(world_size):
    run_distributed(_check_all_to_all, world_size)


def test_identity_without_group():
    x = torch.randn(1, 4, 2, 3)
    assert all_to_all_seq_to_head(x, None) is x
    assert all_to_all_head_to_seq(x, None) is x


def test_pack_pair_interleaves_heads_so_head_groups_stay_whole():
    a = torch.arange(2 * 3 * 4 * 2, dtype=torch.float64).view(2, 3, 4, 2)
    b = -a
    pair = pack_pair(a, b)
    assert pair.shape == (2, 3, 8, 2)
    for h in range(4):
        assert torch.equal(pair[:, :, 2 * h], a[:, :, h]) and torch.equal(pair[:, :, 2 * h + 1], b[:, :, h])
    # head group r of the pair (C = 2: heads 4r .. 4r+3) is head group r of a and of b
    for r in range(2):
        ga, gb = unpack_pair(pair[:, :, 4 * r:4 * r + 4])
        assert torch.equal(ga, a[:, :, 2 * r:2 * r + 2]) and torch.equal(gb, b[:, :, 2 * r:2 * r + 2])
    ua, ub = unpack_pair(pair)
    assert torch.equal(ua, a) and torch.equal(ub, b)
    assert pair_seq_to_head(a, b, None)[0].equal(a) and pair_head_to_seq(a, b, None)[1].equal(b)
