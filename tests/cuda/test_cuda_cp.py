"""UPipe and Ulysses on one GPU (no group) in bf16 against float32 SDPA: the output and every
gradient (UPipe: of x, wq, wk, wv; Ulysses: of q, k, v), for U in {1, 4, H}.

Criterion (FlashAttention's own tests): the bf16 result's largest error against the float32
truth is at most 3 times that of plain bf16 autograd through torch's SDPA (what TorchTitan
runs without this plugin), plus 1e-3 of the truth's largest magnitude for values the bf16
baseline happens to get exact.  So the check follows bf16's own rounding, whatever the
magnitudes of the gradients.  Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.cuda import CUDA, max_error
from tests.helpers.reference import freqs_cis, projected_attention
from torchtitan_upipe import upipe_attention
from torchtitan_upipe.cp.ulysses import ulysses_attention

pytestmark = CUDA

B, S, DIM, HEAD_DIM = 2, 384, 256, 64
HEADS = [(8, 8), (8, 2)]


def _sdpa(q, k, v):
    """Causal SDPA on (B, S, H, D) tensors, GQA by repetition (torch's own autograd)."""
    g = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(g, dim=2) for t in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True)
    return out.transpose(1, 2)


def _leaves(tensors, dtype):
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


def _check(ours, baseline, truth, names, case):
    for what, o, p, t in zip(names, ours, baseline, truth):
        bound = 3 * max_error(p, t) + 1e-3 * t.abs().max().item()
        err = max_error(o, t)
        assert err <= bound, f"{case} {what}: error {err:.3e} > {bound:.3e} (bf16 SDPA: {max_error(p, t):.3e})"


def _run(fn, leaves, dout):
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return [out, *grads]


@pytest.mark.parametrize("kernel", ["sdpa", "cudnn"])
@pytest.mark.parametrize("h,h_kv", HEADS)
@pytest.mark.parametrize("u", [1, 4, 8])
def test_upipe_without_a_group_matches_float32_sdpa(u, h, h_kv, kernel):
    g = torch.Generator(device="cuda").manual_seed(u * 10 + h_kv)
    x = torch.randn(B, S, DIM, device="cuda", generator=g)
    ws = [torch.randn(n * HEAD_DIM, DIM, device="cuda", generator=g) / DIM**0.5
          for n in (h, h_kv, h_kv)]
    dout = torch.randn(B, S, h * HEAD_DIM, device="cuda", generator=g)
    freqs = freqs_cis(S, HEAD_DIM).cuda()

    def plain(*t):
        return projected_attention(*t[:4], freqs, h, h_kv, attend=_sdpa)

    def upipe(*t):
        return upipe_attention(*t[:4], freqs, n_heads=h, n_kv_heads=h_kv, chunk_heads=u,
                               kernel=kernel)

    truth = _run(plain, _leaves([x, *ws], torch.float32), dout)
    baseline = _run(plain, _leaves([x, *ws], torch.bfloat16), dout)
    ours = _run(upipe, _leaves([x, *ws], torch.bfloat16), dout)
    assert all(t.dtype == torch.bfloat16 for t in ours)
    _check(ours, baseline, truth, ("out", "dx", "dwq", "dwk", "dwv"),
           f"upipe U={u} H={h} H_kv={h_kv} kernel={kernel}")


@pytest.mark.parametrize("kernel", ["sdpa", "cudnn"])
@pytest.mark.parametrize("h,h_kv", HEADS)
def test_ulysses_without_a_group_matches_float32_sdpa(h, h_kv, kernel):
    g = torch.Generator(device="cuda").manual_seed(h_kv)
    q, k, v = (torch.randn(B, S, n, HEAD_DIM, device="cuda", generator=g) for n in (h, h_kv, h_kv))
    dout = torch.randn(B, S, h, HEAD_DIM, device="cuda", generator=g)

    def ulysses(*t):
        return ulysses_attention(*t, group=None, kernel=kernel)

    truth = _run(_sdpa, _leaves([q, k, v], torch.float32), dout)
    baseline = _run(_sdpa, _leaves([q, k, v], torch.bfloat16), dout)
    ours = _run(ulysses, _leaves([q, k, v], torch.bfloat16), dout)
    _check(ours, baseline, truth, ("out", "dq", "dk", "dv"), f"ulysses H={h} H_kv={h_kv} kernel={kernel}")
