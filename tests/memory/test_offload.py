"""Offloaded whole-block checkpointing on plain torch modules: exact gradients, host buffers
reused per layer, prefetch and the release of the recomputed output.  (On TorchTitan's Llama3
with the rest of the memory stack: tests/titan/test_memory_stack.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from torchtitan_upipe.memory import HostMemory, HostOffloader, apply_offloaded_ac


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, x, scale):
        return x + torch.tanh(self.lin(x)) * scale


class _Stack(nn.Module):
    def __init__(self, n: int = 4, dim: int = 6) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({str(i): _Block(dim) for i in range(n)})

    def forward(self, x):
        for block in self.layers.values():
            x = block(x, 0.5)
        return x


def _input_and_gradient():
    """A float64 input (two leaves: the model's and the reference's) and the output's gradient."""
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    return x, x.detach().clone().requires_grad_(), torch.randn(2, 5, 6, dtype=torch.float64)


@pytest.mark.parametrize("keep,prefetch", [(0, True), (1, True), (2, False), (4, True)])
def test_gradients_are_exact_and_inputs_live_on_the_host(keep, prefetch):
    torch.manual_seed(0)
    ref = _Stack().double()
    model = copy.deepcopy(ref)
    seen = []
    offloader = HostOffloader(torch.device("cpu"), host_memory=HostMemory(
        pinned=False, allocate=lambda make: seen.append(make()) or seen[-1]))
    apply_offloaded_ac(model, offloader, keep, prefetch)
    assert list(model.state_dict()) == list(ref.state_dict())
    x, x_ref, gy = _input_and_gradient()
    for _ in range(2):  # the second step reuses the host buffers
        model.zero_grad()
        ref.zero_grad()
        out = model(x)
        assert offloader.layers() == list(range(keep, 4))  # inputs of the offloaded layers
        out.backward(gy)
        ref(x_ref).backward(gy)
    torch.testing.assert_close(out, ref(x_ref), rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    assert len(seen) == offloader.allocations == 4 - keep  # one per offloaded layer, once
    assert offloader.host_bytes() == (4 - keep) * x.nbytes


def test_host_buffers_round_trip():
    offloader = HostOffloader(torch.device("cpu"))
    x = torch.randn(3, 4)
    offloader.offload(2, x)
    offloader.prefetch(2)
    offloader.prefetch(1)  # never offloaded: nothing to do
    y = offloader.reload(2)
    assert torch.equal(y, x) and y.untyped_storage() is not x.untyped_storage()
    assert offloader.host_bytes() == x.nbytes


def test_offloaded_inputs_are_pinned_at_exactly_their_size():
    """Each layer's buffer is locked once at its exact size, re-locked when the input's shape
    changes, and unlocked when replaced or closed: pinned bytes == host bytes."""
    from tests.memory.test_host import _Locks

    locks = _Locks()
    memory = HostMemory(pinned=True, register=locks.register, unregister=locks.unregister)
    offloader = HostOffloader(torch.device("cpu"), host_memory=memory)
    for _ in range(2):  # the second step reuses the buffers
        for layer in (1, 2):
            offloader.offload(layer, torch.randn(3, 7, 5))
    assert locks.calls == [("register", 420), ("register", 420)]
    assert offloader.pinned_bytes() == offloader.host_bytes() == 840
    offloader.offload(1, torch.randn(2, 7, 5))  # a new length: a new exact buffer
    assert locks.calls[-2:] == [("unregister", 420), ("register", 280)]
    assert offloader.pinned_bytes() == offloader.host_bytes() == 700
    memory.close()
    assert not locks.locked
    assert HostOffloader(torch.device("cpu")).memory.pinned is False  # nothing to pin on CPU


def test_a_buffer_is_re_created_only_when_its_input_changes_shape():
    offloader = HostOffloader(torch.device("cpu"))
    for x in (torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(4, 3), torch.zeros(4, 3).double()):
        offloader.offload(0, x)
        torch.testing.assert_close(offloader.reload(0), x, rtol=0, atol=0)
    assert offloader.allocations == 3  # (2, 3) once, then (4, 3), then float64


def test_a_reload_fetches_its_part_only_and_a_prefetch_every_part():
    offloader = HostOffloader(torch.device("cpu"))
    x, out = torch.randn(3, 4), torch.randn(3, 5)
    offloader.offload(1, x)
    offloader.offload(1, out, "attention_out")
    assert torch.equal(offloader.reload(1), x)
    assert list(offloader._reloaded) == []  # nothing else came back with the input
    assert torch.equal(offloader.reload(1, "attention_out"), out)
    offloader.prefetch(1)
    assert sorted(offloader._reloaded) == [(1, "attention_out"), (1, "input")]
    with pytest.raises(KeyError, match="layer 2 has no 'input' on the host"):
        offloader.reload(2)


class _CountingBlock(_Block):
    def __init__(self, dim: int, calls: list) -> None:
        super().__init__(dim)
        self.calls = calls

    def forward(self, x, scale):
        self.calls.append(torch.is_grad_enabled())
        return super().forward(x, scale)


@pytest.mark.parametrize("keep,stride,refetch", [(0, 2, False), (0, 3, False), (0, 6, True),
                                                 (2, 2, True), (0, 1, False)])
def test_segments_keep_one_input_per_segment_on_the_host(keep, stride, refetch):
    """memory.offload_stride: 6 layers, the offloaded ones in segments of ``stride``.  The
    gradients are bit for bit those of plain autograd; the host holds each segment's first
    input and ``stride - 1`` scratch buffers (``stride - 2`` without refetch), every
    segment's; each layer but a segment's last runs one more no-grad forward, in the backward;
    and every parked input is taken again (none left on its way to the device)."""
    torch.manual_seed(0)
    calls = {i: [] for i in range(6)}
    ref = _Stack(6).double()
    model = copy.deepcopy(ref)
    for i, block in model.layers.items():
        counting = _CountingBlock(6, calls[int(i)]).double()
        counting.load_state_dict(block.state_dict())
        model.layers[i] = counting
    offloader = HostOffloader(torch.device("cpu"))
    if refetch:  # refetch_input needs the block's attention_norm: give it one
        for block in model.layers.values():
            block.attention_norm = block.lin
    apply_offloaded_ac(model, offloader, keep, stride=stride, refetch_input=refetch)
    x, x_ref, gy = _input_and_gradient()
    for _ in range(2):  # the second step reuses the host buffers
        model.zero_grad()
        ref.zero_grad()
        for c in calls.values():
            c.clear()
        model(x).backward(gy)
        ref(x_ref).backward(gy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    offloaded = 6 - keep
    heads = list(range(keep, 6, stride))
    assert offloader.layers() == heads
    scratch = (stride - 1 if refetch else stride - 2) if stride > 1 else 0
    assert offloader.host_bytes() == (len(heads) + scratch) * x.nbytes
    assert offloader.allocations == len(heads) + scratch  # made once, reused by step 2
    for layer, made in calls.items():
        last = layer >= keep and (layer - keep) % stride == stride - 1
        regenerated = layer >= keep and stride > 1 and not last
        # the forward (no grad), the regenerating one (no grad), the recompute (grad)
        assert made == [False] + [False] * regenerated + [True], (layer, made)
    assert not offloader._reloaded and offloaded % stride == 0
