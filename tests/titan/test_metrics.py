"""The attention timer brackets forward, recompute and backward of every CP attention layer."""

import torch

from torchtitan_upipe.titan.metrics import AttentionTimer, timed


def test_timer_pairs_forward_and_backward():
    timer = AttentionTimer()
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)

    def attention_like(h):
        return torch.tanh(h @ w)

    out = timed(timer, attention_like, x)
    torch.testing.assert_close(out, attention_like(x))  # identity wrappers change nothing
    assert len(timer._pairs) == 1  # the forward
    (out * 2).sum().backward()
    assert len(timer._pairs) == 2  # ... and the backward
    torch.testing.assert_close(x.grad, torch.autograd.grad((attention_like(x) * 2).sum(), x)[0])
    seconds = timer.consume()
    assert seconds > 0 and timer._pairs == [] and timer.consume() == 0.0


def test_no_timer_is_a_plain_call():
    x = torch.randn(3, requires_grad=True)
    assert timed(None, lambda h: h * 3, x).grad_fn.name().startswith("Mul")


def test_host_memory_of_offloaded_activations_is_logged_as_allocated_and_pinned():
    from torchtitan_upipe.memory import HostMemory, HostOffloader
    from torchtitan_upipe.titan.metrics import host_memory_metrics

    assert host_memory_metrics(None) == {}
    locked = {}
    memory = HostMemory(True, register=lambda p, n: locked.__setitem__(p, n),
                        unregister=lambda p: locked.pop(p))
    offloader = HostOffloader(torch.device("cpu"), host_memory=memory)
    offloader.offload(0, torch.zeros(256, 1024))  # 1 MiB
    assert host_memory_metrics(offloader) == {"memory/host_offload(GiB)": 2**-10,
                                              "memory/host_pinned(GiB)": 2**-10}
    memory.close()


def test_mfu_is_shown_only_for_a_device_torchtitan_knows_the_peak_of():
    from torchtitan_upipe.titan.metrics import peak_known

    assert not peak_known("cpu", "x86_64")
    assert not peak_known("cpu", "H100")  # a CPU named like a GPU is still a CPU
    assert peak_known("cuda", "NVIDIA H100 80GB HBM3") and peak_known("cuda", "NVIDIA H200")
    assert not peak_known("cuda", "NVIDIA GeForce RTX 4090")  # TorchTitan would take an A100's
