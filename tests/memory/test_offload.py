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
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    gy = torch.randn(2, 5, 6, dtype=torch.float64)
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
