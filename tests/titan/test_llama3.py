"""TorchTitan's Llama3 with an explicit head_dim: the paper's 32B flavor, and the local RoPE
table of a CP rank."""

import copy

import torch

from torchtitan_upipe.titan.llama3 import FLAVORS, Transformer
from torchtitan_upipe.titan.sharding import ContiguousSharder, UlyssesRingSharder


def test_paper_32b_flavor_shapes():
    with torch.device("meta"):
        model = Transformer(FLAVORS["32B"])
    attn = model.layers["0"].attention
    assert (attn.n_heads, attn.n_kv_heads, attn.head_dim) == (64, 8, 128)
    assert attn.wq.weight.shape == (64 * 128, 5120)
    assert attn.wk.weight.shape == (8 * 128, 5120)
    assert model.layers["0"].feed_forward.w1.weight.shape == (25600, 5120)
    assert len(model.layers) == 64 and model.freqs_cis.shape[-1] == 64
    assert abs(sum(p.numel() for p in model.parameters()) / 1e9 - 32.76) < 0.01


def test_local_rope_table_is_the_full_tables_rows():
    """CP ranks keep only their RoPE rows; they are bit-identical to TorchTitan's full table."""
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
