"""Offloaded whole-block checkpointing on a GPU: the side-stream copies, the prefetch and the
exact-size page-locked host buffers.

Two training steps of a small stack (the second reuses the host buffers) give the gradients
of plain autograd, with prefetch on and off and with pinned and pageable buffers.  The host
memory reported is exactly the block inputs' bytes, page-locked as asked; torch's caching
host allocator, which would round each buffer up to a power of two, holds none of it.
Skipped without CUDA.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers.cuda import CUDA
from tests.memory.test_offload import _Stack
from torchtitan_upipe.memory import HostOffloader, apply_offloaded_ac

pytestmark = CUDA

SHAPE = (3, 37, 6)  # 2664 bytes in float32: a caching allocator would pin 4096


def _host_allocator_bytes() -> int:
    return torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)


@pytest.mark.parametrize("pinned", [True, False])
@pytest.mark.parametrize("prefetch", [True, False])
def test_offloaded_steps_match_autograd_with_exact_host_buffers(prefetch, pinned):
    torch.manual_seed(0)
    ref = _Stack(dim=SHAPE[-1]).cuda()
    model = copy.deepcopy(ref)
    offloader = HostOffloader(torch.device("cuda"), pinned=pinned)
    apply_offloaded_ac(model, offloader, 1, prefetch)
    host_before = _host_allocator_bytes()
    for step in range(2):
        x = torch.randn(*SHAPE, device="cuda", requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        gy = torch.randn(*SHAPE, device="cuda")
        out = model(x)
        out.backward(gy)
        ref_out = ref(x_ref)
        ref_out.backward(gy)
        torch.cuda.synchronize()
        case = f"step {step} prefetch={prefetch} pinned={pinned}"
        torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6, msg=lambda m: f"{case}: {m}")
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6, msg=lambda m: f"{case}: {m}")
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-6, msg=lambda m: f"{case}: {m}")
    exact = 3 * x.nbytes  # layers 1, 2 and 3 are offloaded
    assert x.nbytes == 2664 and offloader.host_bytes() == exact
    assert all(buf.is_pinned() == pinned for buf in offloader._host.values())
    assert offloader.pinned_bytes() == (exact if pinned else 0)
    assert _host_allocator_bytes() == host_before  # nothing went through the caching allocator


def test_the_caching_host_allocator_would_round_the_buffers_up():
    """Why memory/host.py exists: torch's pinned allocation of 5 MiB + 1 byte holds 8 MiB on
    this torch (a size no earlier test pinned, so no cached block serves it)."""
    before = _host_allocator_bytes()
    t = torch.empty(5 * 2**20 + 1, dtype=torch.uint8, pin_memory=True)
    assert t.is_pinned()
    assert _host_allocator_bytes() - before == 8 * 2**20
