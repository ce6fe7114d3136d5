"""The differentiable sequence<->head all-to-all: layout, round trip and gradients."""

import pytest
import torch

from torchtitan_upipe.cp.comm import (
    all_to_all_head_to_seq,
    all_to_all_seq_to_head,
    group_rank,
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
