"""Packed documents on CUDA: each CUDA kernel's document-masked forward and backward against
the math kernel's (``sdpa``: FlashAttention-2's varlen call; ``cudnn``: one call per document), and the plugin's attention module against TorchTitan's own flex-attention
``block_causal`` model, forward and backward (on CUDA TorchTitan's flex attention trains).
Skipped without CUDA.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from tests.helpers.cuda import CUDA, assert_te_close, te_tolerance
from torchtitan_upipe.cp.documents import DocumentKernel, Documents
from torchtitan_upipe.cp.kernels import get_kernel
from torchtitan_upipe.titan.attention import ContextParallelAttention, UlyssesStrategy
from torchtitan_upipe.titan.groups import CPGroups
from torchtitan_upipe.titan.llama3 import FLAVORS, Transformer

pytestmark = CUDA

EOS = 1


def _documents(seq: int) -> Documents:
    tokens = torch.full((2, seq), 7)
    tokens[0, [0, seq // 2 - 1, seq // 2, seq - 1]] = EOS
    tokens[1, torch.arange(3, seq, 37)] = EOS
    return Documents.from_tokens(tokens, EOS)


@pytest.mark.parametrize("kernel", ["sdpa", "cudnn"])
@pytest.mark.parametrize("heads", [(8, 8), (8, 2)], ids=["mha", "gqa"])
def test_cuda_document_kernels_match_math(kernel, heads):
    seq, d, dtype = 1000, 128, torch.bfloat16
    docs = _documents(seq)
    gen = torch.Generator(device="cuda").manual_seed(0)
    h, h_kv = heads
    q = torch.randn(2, seq, h, d, device="cuda", dtype=dtype, generator=gen)
    k, v = (torch.randn(2, seq, h_kv, d, device="cuda", dtype=dtype, generator=gen)
            for _ in range(2))
    dout = torch.randn_like(q)
    scale = d ** -0.5
    results = {}
    for name in (kernel, "math"):
        kern = DocumentKernel(get_kernel(name, torch.device("cuda")), docs)
        out, lse = kern.forward(q, k, v, causal=True, scale=scale)
        results[name] = (out, lse, *kern.backward(dout, q, k, v, out, lse, causal=True, scale=scale))
    device = torch.device("cuda")
    assert DocumentKernel(get_kernel(kernel, device), docs).uses_varlen(device) == (kernel == "sdpa")
    tol = te_tolerance(dtype, h != h_kv)
    for what, got, want in zip(("out", "lse", "dq", "dk", "dv"), results[kernel], results["math"]):
        assert_te_close(got.float(), want.float(), tol, f"{kernel} {what}")


def test_cuda_module_matches_torchtitan_flex_block_causal_forward_and_backward():
    args = copy.deepcopy(FLAVORS["debugmodel_flex_attn"])
    args.n_layers, args.max_seq_len, args.eos_id = 2, 256, EOS
    torch.manual_seed(0)
    with torch.device("cuda"):
        torchtitan = Transformer(args)
        with torch.no_grad():
            torchtitan.init_weights()
    ours = copy.deepcopy(torchtitan)
    for block in ours.layers.values():
        block.attention = ContextParallelAttention(
            block.attention, UlyssesStrategy(CPGroups.local(), get_kernel("math", "cuda")))
    tokens = torch.randint(2, 2048, (2, 256), device="cuda")
    tokens[0, [0, 63, 64, 200]] = EOS
    tokens[1, [100]] = EOS
    masks = torchtitan.get_attention_masks(tokens, SimpleNamespace(eos_id=EOS))
    want = torchtitan(tokens, attention_masks=masks)
    got = ours(tokens, attention_masks=Documents.from_tokens(tokens, EOS))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    grad = torch.randn_like(want)
    want.backward(grad)
    got.backward(grad)
    for (name, p), q in zip(torchtitan.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-4, msg=name)
