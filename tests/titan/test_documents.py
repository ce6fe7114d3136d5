"""``block_causal`` in the model: the plugin's attention module with the batch's Documents
gives the logits of TorchTitan's own Llama3 with its flex-attention document mask (forward
only: TorchTitan's flex attention has no CPU backward), and it is not plain causal attention.
"""

import copy
from types import SimpleNamespace

import pytest
import torch

from torchtitan_upipe.cp.documents import Documents
from torchtitan_upipe.cp.kernels import MathKernel, SdpaKernel
from torchtitan_upipe.titan.attention import ContextParallelAttention, UlyssesStrategy
from torchtitan_upipe.titan.groups import CPGroups
from torchtitan_upipe.titan.llama3 import FLAVORS, Transformer

EOS = 1


def _models(kernel):
    args = copy.deepcopy(FLAVORS["debugmodel_flex_attn"])
    args.n_layers, args.max_seq_len, args.eos_id = 2, 64, EOS
    torch.manual_seed(0)
    torchtitan = Transformer(args)
    with torch.no_grad():
        torchtitan.init_weights()
    ours = copy.deepcopy(torchtitan)
    for block in ours.layers.values():
        block.attention = ContextParallelAttention(block.attention,
                                                   UlyssesStrategy(CPGroups.local(), kernel))
    return torchtitan, ours


def _tokens():
    tokens = torch.randint(2, 2048, (2, 64), generator=torch.Generator().manual_seed(0))
    tokens[0, [0, 9, 31, 32, 50]] = EOS  # a one-token document first, edges of 32-token shards
    tokens[1, [40]] = EOS
    return tokens


@pytest.mark.parametrize("kernel", [MathKernel(), SdpaKernel()], ids=["math", "sdpa"])
def test_block_causal_logits_match_torchtitan_flex_attention(kernel):
    torchtitan, ours = _models(kernel)
    tokens = _tokens()
    with torch.no_grad():
        masks = torchtitan.get_attention_masks(tokens, SimpleNamespace(eos_id=EOS))
        want = torchtitan(tokens, attention_masks=masks)
        docs = Documents.from_tokens(tokens, EOS)
        got = ours(tokens, attention_masks=docs)
        causal = ours(tokens)
    assert docs.count == 8
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    # the mask is really applied: the first document of row 1 (40 tokens) is unchanged, the
    # rest differs from causal attention over the whole row
    torch.testing.assert_close(causal[1, :41], got[1, :41], atol=2e-5, rtol=2e-5)
    assert (causal[1, 41:] - got[1, 41:]).abs().max() > 1e-2


def test_the_module_refuses_other_masks():
    _, ours = _models(MathKernel())
    with pytest.raises(TypeError, match="takes the batch's Documents"):
        ours(_tokens(), attention_masks=object())
