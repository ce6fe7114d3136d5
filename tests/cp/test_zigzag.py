"""The zigzag layout of the ring's sequence: shard, indices and the inverse."""

import pytest
import torch

from torchtitan_upipe.cp.zigzag import zigzag_indices, zigzag_shard, zigzag_unshard


def test_zigzag_layout():
    assert zigzag_indices(16, 4, 0).tolist() == [0, 1, 14, 15]
    assert zigzag_indices(16, 4, 3).tolist() == [6, 7, 8, 9]
    assert zigzag_indices(8, 1, 0).tolist() == list(range(8))
    for degree in (1, 2, 3, 4):
        seq = 2 * degree * 5
        x = torch.randn(2, seq, 3, dtype=torch.float64)
        parts = [zigzag_shard(x, degree, r) for r in range(degree)]
        for r, p in enumerate(parts):
            torch.testing.assert_close(p, x[:, zigzag_indices(seq, degree, r)], rtol=0, atol=0)
        torch.testing.assert_close(zigzag_unshard(parts), x, rtol=0, atol=0)
        # other dims
        y = x.transpose(0, 1)
        parts0 = [zigzag_shard(y, degree, r, dim=0) for r in range(degree)]
        torch.testing.assert_close(zigzag_unshard(parts0, dim=0), y, rtol=0, atol=0)
        covered = torch.cat([zigzag_indices(seq, degree, r) for r in range(degree)]).sort().values
        assert covered.tolist() == list(range(seq))


def test_zigzag_rejects_bad_lengths():
    with pytest.raises(ValueError, match=r"seq_len % \(2 \* degree\) == 0"):
        zigzag_indices(10, 2, 0)
    with pytest.raises(ValueError, match=r"seq_len % \(2 \* degree\) == 0"):
        zigzag_shard(torch.zeros(1, 12, 2), 4, 1)
    with pytest.raises(ValueError, match="out of range"):
        zigzag_indices(8, 2, 2)
    with pytest.raises(ValueError, match="same even length"):
        zigzag_unshard([torch.zeros(1, 3), torch.zeros(1, 3)])
