"""Packed documents: the boundaries (TorchTitan's ``block_causal`` semantics) and the
document-masked kernels, forward (out, lse) and backward, against an explicit block-diagonal
causal mask in float64, with boundaries at every awkward place."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.reference import attention_and_lse
from torchtitan_upipe.cp.documents import DocumentKernel, Documents
from torchtitan_upipe.cp.kernels import MathKernel, SdpaKernel, kernel_attention

EOS = 1
S = 16


def tokens_with_eos(rows: list[list[int]], seq_len: int = S) -> torch.Tensor:
    """(len(rows), seq_len) tokens (no EOS) with an EOS at each listed position of each row."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, 50, (len(rows), seq_len), generator=gen)
    for r, positions in enumerate(rows):
        tokens[r, positions] = EOS
    return tokens


# EOS positions per row (two rows of S = 16): where a document may end
BOUNDARIES = {
    "none": [[], []],  # one document per row: plain causal
    "first_token": [[0], [0, 1]],  # a one-token document at the start
    "last_token": [[15], [7, 15]],  # an EOS as the row's last token opens no new document
    "shard_edges": [[7], [3, 7, 11]],  # the shard edges of C = 2 and C = 4
    "off_edges": [[4, 9], [2, 12]],  # inside shards, a document longer than a shard of C = 4
    "every_token": [list(range(S)), [5]],  # sixteen one-token documents
}


def test_boundaries_follow_torchtitan_block_causal():
    from torchtitan.models.attention import create_varlen_metadata_for_document, get_document_mask_mod

    for rows in BOUNDARIES.values():
        tokens = tokens_with_eos(rows)
        docs = Documents.from_tokens(tokens, EOS)
        meta = create_varlen_metadata_for_document(tokens, EOS)
        assert docs.cu_seqlens.tolist() == meta.cu_seq_q.tolist()
        assert docs.max_len == meta.max_q
        same = get_document_mask_mod(tokens.clone(), EOS)
        b, q, kv = torch.meshgrid(torch.arange(2), torch.arange(S), torch.arange(S), indexing="ij")
        ids = docs.doc_ids()
        assert torch.equal(same(b, None, q, kv), ids[b, q] == ids[b, kv])


def test_documents_know_their_segments():
    docs = Documents.from_tokens(tokens_with_eos([[4, 9], [15]]), EOS)
    assert docs.segments == ((0, 0, 5), (0, 5, 10), (0, 10, 16), (1, 0, 16))
    assert docs.count == 4 and docs.max_len == 16 and not docs.whole
    assert Documents.whole_rows(2, S).whole
    assert "count=4" in repr(docs)


@pytest.mark.parametrize("cu", [[0, 16, 16, 32], [0, 5, 32], [1, 16, 32], [0, 16, 31]])
def test_malformed_boundaries_are_refused(cu):
    with pytest.raises(ValueError, match="cu_seqlens"):
        Documents(torch.tensor(cu), 2, S)


def _case(h, h_kv, d=8, seq_len=S, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, h, d, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, seq_len, h_kv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, seq_len, h_kv, d, generator=gen, dtype=torch.float64)
    dout = torch.randn(batch, seq_len, h, d, generator=gen, dtype=torch.float64)
    return q, k, v, dout


def _check_against_reference(inner, docs, q, k, v, dout, tol=1e-10):
    scale = q.shape[-1] ** -0.5
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = attention_and_lse(*leaves, causal=True, scale=scale, doc_ids=docs.doc_ids())
    ref.backward(dout)
    kernel = DocumentKernel(inner, docs)
    out, lse = kernel.forward(q, k, v, causal=True, scale=scale)
    torch.testing.assert_close(out, ref.detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse.to(torch.float64), ref_lse.detach(), atol=tol, rtol=tol)
    mine = [t.clone().requires_grad_() for t in (q, k, v)]
    out = kernel_attention(*mine, kernel=kernel, causal=True, scale=scale)
    out.backward(dout)
    for got, want in zip(mine, leaves):
        torch.testing.assert_close(got.grad, want.grad, atol=tol, rtol=tol)


@pytest.mark.parametrize("inner", [MathKernel(), SdpaKernel()], ids=["math", "sdpa"])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 3)], ids=["mha", "gqa4", "gqa2"])
@pytest.mark.parametrize("where", list(BOUNDARIES))
def test_document_kernel_matches_an_explicit_block_diagonal_mask(inner, heads, where):
    docs = Documents.from_tokens(tokens_with_eos(BOUNDARIES[where]), EOS)
    _check_against_reference(inner, docs, *_case(*heads))


def test_thousands_of_tiny_documents():
    seq_len = 3000
    gen = torch.Generator().manual_seed(1)
    ends = torch.cumsum(torch.randint(1, 4, (seq_len,), generator=gen), 0)  # lengths 1-3
    rows = [ends[ends < seq_len].tolist(), [seq_len // 2]]
    docs = Documents.from_tokens(tokens_with_eos(rows, seq_len), EOS)
    assert docs.count > 1000
    _check_against_reference(SdpaKernel(), docs, *_case(2, 1, 4, seq_len))


def test_the_mask_changes_the_result():
    q, k, v, _ = _case(4, 2)
    scale = 8 ** -0.5
    docs = Documents.from_tokens(tokens_with_eos(BOUNDARIES["shard_edges"]), EOS)
    masked, _ = DocumentKernel(SdpaKernel(), docs).forward(q, k, v, causal=True, scale=scale)
    causal, _ = SdpaKernel().forward(q, k, v, causal=True, scale=scale)
    assert not torch.allclose(masked, causal)
    first = slice(0, 8)  # row 0's first document is tokens 0..7: the same as causal there
    torch.testing.assert_close(masked[0, first], causal[0, first], atol=1e-12, rtol=1e-12)


def test_calls_that_are_not_whole_causal_sequences_are_refused():
    docs = Documents.whole_rows(2, S)
    q, k, v, _ = _case(4, 2)
    kernel = DocumentKernel(MathKernel(), docs)
    with pytest.raises(ValueError, match="causal calls only"):
        kernel.forward(q, k, v, causal=False, scale=1.0)
    with pytest.raises(ValueError, match="whole sequence"):
        kernel.forward(q[:, :8], k[:, :8], v[:, :8], causal=True, scale=1.0)


class _VarlenOnCpu(MathKernel):
    """A kernel with a varlen path on CPU, built from the math kernel one document at a time
    in the varlen layouts (tokens flattened, ``lse (H, T)``): it checks DocumentKernel's
    reshapes and LSE transposes around a varlen call, which on CUDA is FlashAttention-2's."""

    def __init__(self):
        self.calls = 0

    def varlen_on(self, device):
        return True

    def _docs(self, cu):
        cu = cu.tolist()
        return list(zip(cu[:-1], cu[1:]))

    def forward_varlen(self, q, k, v, cu_seqlens, max_len, *, scale):
        assert cu_seqlens.dtype == torch.int32 and q.dim() == 3
        self.calls += 1
        out, lse = torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0])
        for a, e in self._docs(cu_seqlens):
            o, l = self.forward(q[None, a:e], k[None, a:e], v[None, a:e], causal=True, scale=scale)
            out[a:e], lse[:, a:e] = o[0], l[0]
        return out, lse

    def backward_varlen(self, dout, q, k, v, out, lse, cu_seqlens, max_len, *, scale):
        assert lse.shape == (q.shape[1], q.shape[0])
        grads = [torch.empty_like(t) for t in (q, k, v)]
        for a, e in self._docs(cu_seqlens):
            g = self.backward(dout[None, a:e], q[None, a:e], k[None, a:e], v[None, a:e],
                              out[None, a:e], lse[None, :, a:e], causal=True, scale=scale)
            for grad, part in zip(grads, g):
                grad[a:e] = part[0]
        return tuple(grads)


@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_a_varlen_path_takes_all_documents_in_one_call(heads):
    docs = Documents.from_tokens(tokens_with_eos(BOUNDARIES["off_edges"]), EOS)
    assert DocumentKernel(_VarlenOnCpu(), docs).uses_varlen(torch.device("cpu"))
    assert not DocumentKernel(SdpaKernel(), docs).uses_varlen(torch.device("cpu"))
    inner = _VarlenOnCpu()
    _check_against_reference(inner, docs, *_case(*heads))
    assert inner.calls == 2  # one per forward (the check runs two), not one per document
