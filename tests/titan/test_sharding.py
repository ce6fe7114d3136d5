"""Sequence sharders: which tokens (and RoPE positions) each CP rank holds."""

import pytest
import torch

from torchtitan_upipe.titan.sharding import ContiguousSharder, UlyssesRingSharder


def test_contiguous_sharder():
    parts = [ContiguousSharder(4, r) for r in range(4)]
    t = torch.arange(16).view(1, 16)
    assert [p.shard(t).tolist()[0] for p in parts] == [list(range(4 * r, 4 * r + 4)) for r in range(4)]
    assert parts[2].positions(2, 16).tolist() == [[8, 9, 10, 11]] * 2
    with pytest.raises(ValueError, match="sequence length 18 is not divisible by 4"):
        parts[0].shard(torch.zeros(1, 18))
    with pytest.raises(ValueError, match="outside a context-parallel group of 4"):
        ContiguousSharder(4, 4)


def test_hybrid_sharder_layout_and_all_to_all_composition():
    # S = 16, R = 2, u = 2 (the docstring's picture)
    got = {(p, j): UlyssesRingSharder(2, 2, j, p).indices(16).tolist() for p in range(2) for j in range(2)}
    assert got[(0, 0)] == [0, 1, 2, 3] and got[(0, 1)] == [12, 13, 14, 15]
    assert got[(1, 0)] == [4, 5, 6, 7] and got[(1, 1)] == [8, 9, 10, 11]
    # the all-to-all concatenates the Ulysses pieces in rank order: the ring's zigzag shard
    from torchtitan_upipe.cp.zigzag import zigzag_indices

    for r, u in ((2, 2), (2, 4), (4, 2)):
        seq = 8 * r * u
        for p in range(r):
            gathered = sum((UlyssesRingSharder(u, r, j, p).indices(seq).tolist() for j in range(u)), [])
            assert gathered == zigzag_indices(seq, r, p).tolist()
        every = sorted(i for p in range(r) for j in range(u) for i in UlyssesRingSharder(u, r, j, p).indices(seq).tolist())
        assert every == list(range(seq))


def test_hybrid_sharder_rejects_lengths_not_divisible_by_2c():
    with pytest.raises(ValueError, match="not divisible by 8"):
        UlyssesRingSharder(2, 2, 0, 0).indices(20)


def test_padded_length_is_the_next_length_the_layout_splits():
    from torchtitan_upipe.titan.sharding import padded_length

    assert padded_length(509, 2, 1) == 510 and padded_length(510, 2, 1) == 510
    assert padded_length(509, 2, 2) == 512 and padded_length(512, 4, 2) == 512
    assert padded_length(1, 8, 1) == 8 and padded_length(9, 4, 4) == 16
