"""Ulysses and UPipe with packed documents (``block_causal``) against a single-device
reference with an explicit block-diagonal causal mask: output, input and weight gradients in
float64 on 2 and 4 gloo ranks, GQA and replicated KV heads, U in {C, 2C, H}, documents that end
at the first token, the last token, at shard edges, inside shards and in long runs of tiny ones.
"""

import pytest
import torch
import torch.distributed as dist

from tests.helpers.dist import run_distributed
from tests.helpers.reference import attention, attention_case, freqs_cis, projected_attention
from torchtitan_upipe import ulysses_attention, upipe_attention
from torchtitan_upipe.cp.documents import Documents

EOS = 1
S_LOCAL, HEAD_DIM, DIM = 6, 4, 12


def _documents(c: int) -> dict[str, Documents]:
    """Two-row batches of ``S = 6 C`` tokens with EOS tokens at the named places."""
    seq = S_LOCAL * c
    edge = S_LOCAL - 1  # the last token of rank 0's shard
    cases = {
        "first_and_last": [[0, seq - 1], [0, 1, 2]],
        "shard_edges": [[edge, 2 * edge + 1], list(range(edge, seq, S_LOCAL))],
        "inside_and_across": [[2, seq - 3], [S_LOCAL + 1]],  # documents longer than a shard
        "tiny": [list(range(0, seq, 2)), list(range(seq))],
    }
    out = {}
    for name, rows in cases.items():
        tokens = torch.full((2, seq), 7)
        for r, positions in enumerate(rows):
            tokens[r, positions] = EOS
        out[name] = Documents.from_tokens(tokens, EOS)
    return out


def _ulysses_case(rank, c, h, hkv, docs, kernel):
    seq = S_LOCAL * c
    q, k, v, dout, _ = attention_case(2, seq, h, hkv, 8, seed=h * 7 + hkv)
    for t in (q, k, v):
        t.grad = None
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = attention(*leaves, doc_ids=docs.doc_ids())
    ref.backward(dout)
    sl = slice(rank * S_LOCAL, (rank + 1) * S_LOCAL)
    ql, kl, vl = (t.detach()[:, sl].clone().requires_grad_() for t in (q, k, v))
    out = ulysses_attention(ql, kl, vl, group=dist.group.WORLD, kernel=kernel, documents=docs)
    out.backward(dout[:, sl])
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, ref.detach()[:, sl], **tol)
    for got, want in zip((ql, kl, vl), leaves):
        torch.testing.assert_close(got.grad, want.grad[:, sl], **tol)


def _ulysses_grid(rank, c, kernel):
    for docs in _documents(c).values():
        for h, hkv in [(4, 4), (8, 2), (4, 1)]:  # MHA, GQA, KV heads replicated (C > H_kv)
            _ulysses_case(rank, c, h, hkv, docs, kernel)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("kernel", ["math", "sdpa"])
def test_ulysses_with_documents_matches_single_device(world_size, kernel):
    run_distributed(_ulysses_grid, world_size, kernel)


def _upipe_case(rank, c, h, hkv, u, docs, kernel, inline):
    seq = S_LOCAL * c
    g = torch.Generator().manual_seed(h * 100 + hkv * 10 + u)
    x = torch.randn(2, seq, DIM, generator=g, dtype=torch.float64)
    ws = [torch.randn(n * HEAD_DIM, DIM, generator=g, dtype=torch.float64) / DIM**0.5
          for n in (h, hkv, hkv)]
    dout = torch.randn(2, seq, h * HEAD_DIM, generator=g, dtype=torch.float64)
    freqs = freqs_cis(seq, HEAD_DIM)
    params = [t.clone().requires_grad_() for t in (x, *ws)]
    ids = docs.doc_ids()
    ref = projected_attention(*params, freqs, h, hkv,
                              attend=lambda q, k, v: attention(q, k, v, doc_ids=ids))
    ref.backward(dout)
    sl = slice(rank * S_LOCAL, (rank + 1) * S_LOCAL)
    xl = x[:, sl].clone().requires_grad_()
    wl = [w.clone().requires_grad_() for w in ws]
    out = upipe_attention(xl, *wl, freqs[sl], n_heads=h, n_kv_heads=hkv, chunk_heads=u,
                          group=dist.group.WORLD, kernel=kernel, inline=inline, documents=docs)
    out.backward(dout[:, sl])
    tol = dict(rtol=1e-10, atol=1e-10)
    msg = f"H={h} H_kv={hkv} C={c} U={u}"
    torch.testing.assert_close(out, ref.detach()[:, sl], **tol, msg=lambda m: f"{msg} out: {m}")
    torch.testing.assert_close(xl.grad, params[0].grad[:, sl], **tol)
    for w_local, w_ref in zip(wl, params[1:]):
        grad = w_local.grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, w_ref.grad, **tol, msg=lambda m: f"{msg} dw: {m}")


def _upipe_grid(rank, c, kernel):
    ran = 0
    for name, docs in _documents(c).items():
        for h, hkv in [(8, 2), (8, 8), (4, 1)]:
            for u in sorted({c, 2 * c, h}):
                if u > h or h % u:
                    continue
                _upipe_case(rank, c, h, hkv, u, docs, kernel, inline=(name == "tiny"))
                ran += 1
    assert ran >= 16, ran


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("kernel", ["math", "sdpa"])
def test_upipe_with_documents_matches_single_device(world_size, kernel):
    run_distributed(_upipe_grid, world_size, kernel)


def _refusals(rank, c):
    docs = Documents.whole_rows(2, 4 * c)
    x = torch.randn(2, 3, DIM)  # 3 local tokens: the documents describe 4 per rank
    w = torch.randn(4 * HEAD_DIM, DIM)
    with pytest.raises(ValueError, match="do not describe this batch"):
        upipe_attention(x, w, w, w, freqs_cis(3, HEAD_DIM), n_heads=4, n_kv_heads=4,
                        group=dist.group.WORLD, kernel="math", documents=docs)
    q = torch.randn(2, 3, 4, HEAD_DIM)
    with pytest.raises(ValueError, match="whole sequence"):
        ulysses_attention(q, q, q, group=dist.group.WORLD, kernel="math", documents=docs)


def test_documents_that_do_not_match_the_batch_are_refused():
    run_distributed(_refusals, 2)
