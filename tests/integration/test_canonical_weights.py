"""Canonical weights: a model with a CP style installed has TorchTitan's Llama3 state dict,
which TorchTitan's adapter turns into HF Llama weights that a real ``transformers``
LlamaForCausalLM runs to the same logits, and back."""

import copy

import pytest
import torch

from torchtitan.models.llama3 import Transformer as TorchTitanTransformer
from torchtitan.models.llama3.model.state_dict_adapter import Llama3StateDictAdapter
from torchtitan_upipe.cp.kernels import get_kernel
from torchtitan_upipe.titan.groups import CPGroups
from torchtitan_upipe.titan.attention import ContextParallelAttention, UlyssesStrategy, UPipeStrategy
from torchtitan_upipe.titan.llama3 import FLAVORS, Transformer

import transformers  # a declared test dependency (pyproject [test]): the real HF Llama

SEQ = 24


def _args():
    args = copy.deepcopy(FLAVORS["debugmodel"])
    args.n_kv_heads = 4  # exercise GQA (16 query heads, 4 KV heads)
    args.max_seq_len = SEQ
    return args


def _model(style, args):
    torch.manual_seed(0)
    model = Transformer(args)
    with torch.no_grad():
        model.init_weights()
    groups = CPGroups.local()
    for block in model.layers.values():
        strategy = (UPipeStrategy(groups, "math", 2) if style == "upipe"
                    else UlyssesStrategy(groups, get_kernel("math")))
        block.attention = ContextParallelAttention(block.attention, strategy)
    return model.eval()


def _hf_model(args):
    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=768,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads, rms_norm_eps=args.norm_eps, max_position_embeddings=SEQ,
        rope_theta=args.rope_theta, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        rope_scaling={
            "rope_type": "llama3", "factor": args.rope_scaling_args.scaling_factor,
            "low_freq_factor": args.rope_scaling_args.low_freq_factor,
            "high_freq_factor": args.rope_scaling_args.high_freq_factor,
            "original_max_position_embeddings": args.rope_scaling_args.original_max_position_embeddings,
        },
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("style", ["upipe", "ulysses"])
def test_cp_model_state_dict_is_torchtitans_and_runs_in_hf_llama(style):
    args = _args()
    model = _model(style, args)
    plain = TorchTitanTransformer(args)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}

    tokens = torch.randint(0, args.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(SEQ).expand(2, SEQ)
    with torch.no_grad():
        logits = model(tokens, positions=positions)
        plain.load_state_dict(model.state_dict())
        torch.testing.assert_close(plain(tokens), logits, rtol=1e-5, atol=1e-5)

        adapter = Llama3StateDictAdapter(args, None)
        hf = _hf_model(args)
        missing, unexpected = hf.load_state_dict(adapter.to_hf(model.state_dict()), strict=False)
        assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
        torch.testing.assert_close(hf(tokens).logits, logits, rtol=1e-4, atol=1e-4)

        # and back: HF weights -> TorchTitan names -> the CP model, same logits
        other = _model(style, args)
        other.load_state_dict(adapter.from_hf(hf.state_dict()))
        torch.testing.assert_close(other(tokens, positions=positions), logits, rtol=1e-5, atol=1e-5)
