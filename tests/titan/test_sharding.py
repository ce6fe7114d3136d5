"""Sequence sharders and the guard that a model sees the sharding it was built for."""

import pytest
import torch
from torch import nn

from torchtitan_upipe.titan.attention import check_sharding_once
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


class _Model(nn.Module):
    def forward(self, tokens, positions=None):
        return tokens


@pytest.mark.parametrize("sharder", [ContiguousSharder(2, 1), UlyssesRingSharder(2, 2, 1, 0)])
def test_first_forward_checks_positions_then_gets_out_of_the_way(sharder):
    model = _Model()
    check_sharding_once(model, sharder)
    tokens = torch.zeros(1, 4)
    wrong = torch.arange(4).view(1, 4)  # rank 0's tokens, but this sharder is another rank's
    with pytest.raises(RuntimeError, match="not sharded as"):
        model(tokens, positions=wrong)
    with pytest.raises(RuntimeError, match="needs the global positions"):
        model(tokens)
    right = sharder.positions(1, 4 * sharder.degree)
    model(tokens, positions=right)
    model(tokens, positions=wrong)  # checked once, then the hook is gone


def test_local_rope_table_is_the_full_tables_rows():
    """CP ranks keep only their RoPE rows; they are bit-identical to TorchTitan's full table."""
    import copy

    from torchtitan_upipe.titan.llama3 import FLAVORS, Transformer

    for flavor in ("debugmodel", "8B", "32B"):
        args = copy.deepcopy(FLAVORS[flavor])
        args.max_seq_len, args.n_layers = 65536, 1
        with torch.device("meta"):
            model = Transformer(args)
        full = model._precompute_freqs_cis()
        for sharder in (ContiguousSharder(4, 3), UlyssesRingSharder(2, 2, 1, 1)):
            idx = sharder.indices(65536)
            model.use_local_rope(idx)
            assert torch.equal(model._precompute_freqs_cis(), full[idx]), (flavor, type(sharder))
