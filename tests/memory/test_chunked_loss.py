"""Chunked cross entropy: exact against TorchTitan's loss (float64), ignored labels, bf16, and
the (S, vocab) logits never existing."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchtitan.components.loss import IGNORE_INDEX, cross_entropy_loss

from tests.helpers.numerics import DIM, S, TILES, VOCAB, LiveBytes, close, grads, leaf
from torchtitan_upipe.memory import chunked_cross_entropy



def _ref_loss(h, w, labels):
    # TorchTitan's cross_entropy_loss on a bias-free output Linear, kept in h's dtype
    # (TorchTitan's .float() would downcast float64; tested separately in float32)
    logits = F.linear(h, w)
    return F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(0, 1), reduction="sum", ignore_index=IGNORE_INDEX
    )


def _labels(batch, s, gen):
    labels = torch.randint(0, VOCAB, (batch, s), generator=gen)
    labels[0, 0] = IGNORE_INDEX
    labels[-1, -1] = IGNORE_INDEX
    labels[:, 3:5] = IGNORE_INDEX  # with 3 chunks of S=7 (3, 2, 2) the 2nd is all-ignored
    return labels


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("num_chunks", TILES)
def test_chunked_cross_entropy_matches_reference(batch, num_chunks):
    g = torch.Generator().manual_seed(batch * 7 + num_chunks)
    h = leaf(batch, S, DIM, gen=g)
    w = leaf(VOCAB, DIM, gen=g, scale=0.5)
    labels = _labels(batch, S, g)
    assert torch.tensor_split(labels, 3, dim=1)[1].eq(IGNORE_INDEX).all()

    ref = _ref_loss(h, w, labels)
    out = chunked_cross_entropy(h, w, labels, num_chunks)
    assert out.dtype == torch.float64 and out.dim() == 0
    close(out, ref)
    scale = torch.tensor(0.37, dtype=torch.float64)  # non-unit upstream grad
    for got, want in zip(grads(out, (h, w), scale), grads(ref, (h, w), scale)):
        close(got, want)


def test_chunked_cross_entropy_all_ignored():
    h = leaf(2, S, DIM)
    w = leaf(VOCAB, DIM)
    labels = torch.full((2, S), IGNORE_INDEX)
    out = chunked_cross_entropy(h, w, labels, 3)
    close(out, _ref_loss(h, w, labels))
    assert out.item() == 0.0
    dh, dw = grads(out, (h, w), torch.tensor(1.0, dtype=torch.float64))
    assert not dh.any() and not dw.any()


def test_chunked_cross_entropy_custom_ignore_index():
    g = torch.Generator().manual_seed(11)
    h, w = leaf(2, S, DIM, gen=g), leaf(VOCAB, DIM, gen=g)
    labels = torch.randint(0, VOCAB, (2, S), generator=g)
    labels[:, 1] = 3
    ref = F.cross_entropy(F.linear(h, w).flatten(0, 1), labels.flatten(), reduction="sum",
                          ignore_index=3)
    out = chunked_cross_entropy(h, w, labels, 3, ignore_index=3)
    close(out, ref)
    for got, want in zip(grads(out, (h, w), None), grads(ref, (h, w), None)):
        close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_vs_torchtitan(dtype):
    """Low-precision semantics: model-dtype logits, float32 loss, as cross_entropy_loss."""
    g = torch.Generator().manual_seed(2)
    output = nn.Linear(32, 50, bias=False).to(dtype)
    h = torch.randn(2, 20, 32, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (2, 20), generator=g)
    labels[:, 5:9] = IGNORE_INDEX

    ref = cross_entropy_loss(output(h), labels)
    dh_ref, dw_ref = grads(ref, (h, output.weight), None)
    out = chunked_cross_entropy(h, output.weight, labels, 3)
    assert out.dtype == ref.dtype == torch.float32
    dh, dw = grads(out, (h, output.weight), None)
    assert dh.dtype == dw.dtype == dtype
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(dh, dh_ref, **tol)
    torch.testing.assert_close(dw, dw_ref, **tol)


def test_chunked_cross_entropy_memory():
    """The (S, vocab) logits never exist: the peak stays below one full float32 logits."""
    s, dim, vocab = 256, 16, 512
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, s, dim, generator=g)
    w = torch.randn(vocab, dim, generator=g)
    labels = torch.randint(0, vocab, (1, s), generator=g)
    full_logits = s * vocab * 4

    def peak(fn):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with LiveBytes() as mode:
            fn(hh, ww).backward()
        assert hh.grad is not None and ww.grad is not None
        return mode.peak

    untiled = peak(lambda hh, ww: cross_entropy_loss(F.linear(hh, ww), labels))
    chunked = peak(lambda hh, ww: chunked_cross_entropy(hh, ww, labels, 16))
    assert untiled > 2 * full_logits
    assert chunked < 0.5 * full_logits, (chunked, full_logits)
