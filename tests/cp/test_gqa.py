"""KV-head replication for an all-to-all, and the one replicate/reduce pair."""

import pytest
import torch

from torchtitan_upipe.cp.gqa import kv_replication, repeat_kv_heads, sum_kv_heads


def test_replication_rules():
    assert kv_replication(32, 8, 8) == 1  # KV heads split over the ranks
    assert kv_replication(32, 8, 16) == 2  # each KV head on 2 ranks
    assert kv_replication(8, 1, 4) == 4
    assert kv_replication(4, 4, 1) == 1
    with pytest.raises(ValueError, match="n_heads=12 is not divisible by the all-to-all degree 8"):
        kv_replication(12, 4, 8)
    with pytest.raises(ValueError, match="n_kv_heads=3 and the all-to-all degree 2 are incompatible"):
        kv_replication(12, 3, 2)
    with pytest.raises(ValueError, match="must be a multiple of n_kv_heads"):
        kv_replication(12, 5, 1)
    with pytest.raises(ValueError, match="must be positive"):
        kv_replication(12, 4, 0)


def test_repeat_is_canonical_gqa_and_sum_is_its_gradient():
    t = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert repeat_kv_heads(t, 1) is t and sum_kv_heads(t, 1) is t
    rep = repeat_kv_heads(t, 3)
    assert rep.shape == (2, 3, 12, 5)
    for h in range(12):  # query head h reads KV head h // 3
        assert torch.equal(rep[:, :, h], t[:, :, h // 3])
    g = torch.randn_like(rep)
    (grad,) = torch.autograd.grad(rep, t, g)
    torch.testing.assert_close(sum_kv_heads(g, 3), grad, rtol=0, atol=0)
    # the kernels hand over BSHD views of BHSD gradients: no copy needed, same sums
    bhsd = g.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(sum_kv_heads(bhsd, 3), grad, rtol=0, atol=0)
