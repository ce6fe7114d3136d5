"""The attention module a style installs: the guard that a model sees the sharding it was
built for.  (Its values are checked against single-device attention in tests/cp/ and by the
trainer parity tests; its state dict in tests/integration/test_canonical_weights.py.)"""

import pytest
import torch
from torch import nn

from torchtitan_upipe.titan.attention import check_sharding_once
from torchtitan_upipe.titan.sharding import ContiguousSharder, UlyssesRingSharder


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
