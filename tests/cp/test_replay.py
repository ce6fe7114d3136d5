"""Kept attention results (cp/replay.py): a slot records in the forward and replays in the
recompute, and the attention's values and gradients are those of a recompute, bit for bit.

Single process here (no all-to-all, float64); the multi-rank exactness of UPipe, Ulysses,
USP and UPipe x ring under the offloaded checkpoint is tests/titan/test_memory_stack.py's.
"""

import pytest
import torch

from tests.cp.test_upipe import DIM, HEAD_DIM, _tensors, _wo
from tests.helpers.reference import freqs_cis
from torchtitan_upipe import ulysses_attention, upipe_attention
from torchtitan_upipe.cp.kernels import AttentionKernel, get_kernel
from torchtitan_upipe.cp.replay import AttentionSlot, Mode, ReplayKernel
from torchtitan_upipe.memory import HostOffloader


class CountingKernel(AttentionKernel):
    """The math kernel, counting forward calls (a stand-in would prove nothing)."""

    def __init__(self):
        self.inner = get_kernel("math", torch.device("cpu"))
        self.name, self.forwards = self.inner.name, 0

    def forward(self, q, k, v, *, causal, scale):
        self.forwards += 1
        return self.inner.forward(q, k, v, causal=causal, scale=scale)

    def backward(self, *args, **kwargs):
        return self.inner.backward(*args, **kwargs)


def _qkv(seed=0, b=2, s=12, h=4, hkv=2, d=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, n, d, generator=g, dtype=torch.float64) for n in (h, hkv, hkv)]


def test_a_slot_is_in_one_mode_at_a_time_and_says_what_went_wrong():
    slot = AttentionSlot(3)
    assert slot.mode is Mode.OFF
    with slot.recording():
        assert slot.mode is Mode.RECORD
        with pytest.raises(RuntimeError, match="layer 3: attention slot already in record"):
            with slot.replaying():
                pass
    assert slot.mode is Mode.OFF
    with pytest.raises(RuntimeError, match="layer 3: the recompute found no kept attention output"):
        slot.take()
    with pytest.raises(ValueError):  # the mode is restored when the block raises
        with slot.replaying():
            raise ValueError
    assert slot.mode is Mode.OFF


def test_a_device_slot_hands_back_what_it_kept_once():
    slot = AttentionSlot(0)
    out, lse = torch.randn(2, 3), torch.randn(2)
    slot.keep(out, lse)
    got = slot.take()
    assert got[0] is out and got[1] is lse
    assert (slot.recorded, slot.replayed) == (1, 1)
    with pytest.raises(RuntimeError, match="no kept attention output"):
        slot.take()  # let go: the backward holds them now


def test_a_host_slot_keeps_copies_in_the_layers_host_buffers():
    offloader = HostOffloader(torch.device("cpu"))
    offloader.offload(2, torch.randn(4, 5))  # the block input
    slot = AttentionSlot(2, offloader)
    out, lse = torch.randn(4, 6), torch.randn(4, dtype=torch.float32)
    slot.keep(out, lse)
    assert offloader.layers() == [2] and offloader.allocations == 3  # input, out, lse
    assert offloader.host_bytes() == (20 + 24) * 4 + 4 * 4
    offloader.prefetch(2)  # the layer above's backward prefetches all of this layer's parts
    got_out, got_lse = slot.take()
    assert got_out is not out and torch.equal(got_out, out) and torch.equal(got_lse, lse)
    slot.keep(out * 2, lse)  # the next step reuses the buffers
    assert offloader.allocations == 3
    assert torch.equal(slot.take()[0], out * 2)


def test_replay_kernel_records_then_replays_without_running_the_forward():
    q, k, v = _qkv()
    inner = CountingKernel()
    slot = AttentionSlot(0)
    kernel = ReplayKernel(inner, slot)
    with slot.recording():
        out, lse = kernel.forward(q, k, v, causal=True, scale=0.3)
    assert inner.forwards == 1
    with slot.replaying():
        out2, lse2 = kernel.forward(q, k, v, causal=True, scale=0.3)
    assert inner.forwards == 1 and out2 is out and lse2 is lse
    kernel.forward(q, k, v, causal=True, scale=0.3)  # off: computes, keeps nothing
    assert inner.forwards == 2
    with pytest.raises(RuntimeError):
        slot.take()


def test_ulysses_replays_its_kernel_result_exactly():
    kernel = CountingKernel()
    slot = AttentionSlot(0)
    q, k, v = _qkv(seed=1)
    with torch.no_grad(), slot.recording():
        ulysses_attention(q, k, v, group=None, kernel=kernel, keep=slot)
    with slot.replaying():
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        out = ulysses_attention(qg, kg, vg, group=None, kernel=kernel, keep=slot)
    assert kernel.forwards == 1  # the replay ran no kernel forward
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
    out.backward(dout)
    fresh_q, fresh_k, fresh_v = (t.clone().requires_grad_() for t in (q, k, v))
    ref = ulysses_attention(fresh_q, fresh_k, fresh_v, group=None, kernel=kernel)
    ref.backward(dout)
    assert torch.equal(out, ref)
    for got, want in zip((qg, kg, vg), (fresh_q, fresh_k, fresh_v)):
        assert torch.equal(got.grad, want.grad)


@pytest.mark.parametrize("fused_wo", [False, True], ids=["attention", "fused_wo"])
@pytest.mark.parametrize("inline", [False, True], ids=["op", "inline"])
@pytest.mark.parametrize("h,hkv,u", [(4, 2, 1), (4, 2, 4), (6, 3, 2), (4, 1, 2)])
def test_upipe_replays_the_fused_op_exactly(h, hkv, u, inline, fused_wo, monkeypatch):
    from torchtitan_upipe.cp.kernels.math import MathKernel

    calls = []
    forward = MathKernel.forward
    monkeypatch.setattr(MathKernel, "forward", lambda self, *a, **kw: calls.append(1) or forward(self, *a, **kw))
    s = 10
    x, wq, wk, wv, dout = _tensors(2, s, h, hkv, seed=h + hkv + u)
    leaves = (x, wq, wk, wv) + ((_wo(h, u),) if fused_wo else ())
    if fused_wo:
        dout = torch.randn(2, s, DIM, generator=torch.Generator().manual_seed(u), dtype=dout.dtype)
    freqs = freqs_cis(s, HEAD_DIM)
    kw = dict(n_heads=h, n_kv_heads=hkv, chunk_heads=u, kernel="math", inline=inline)

    def attend(x, wq, wk, wv, wo=None, **more):
        return upipe_attention(x, wq, wk, wv, freqs, wo=wo, **kw, **more)

    ref_params = [t.clone().requires_grad_() for t in leaves]
    ref = attend(*ref_params)
    ref.backward(dout)
    assert len(calls) == h // u  # one kernel forward per stage
    calls.clear()

    slot = AttentionSlot(0)
    with torch.no_grad(), slot.recording():
        attend(*leaves, keep=slot)
    assert len(calls) == h // u and slot.recorded == 1
    params = [t.clone().requires_grad_() for t in leaves]
    with slot.replaying():
        out = attend(*params, keep=slot)
    assert len(calls) == h // u  # the replay ran no stage
    out.backward(dout)
    assert torch.equal(out, ref)
    for name, got, want in zip(("dx", "dwq", "dwk", "dwv", "dwo"), params, ref_params):
        assert torch.equal(got.grad, want.grad), name
