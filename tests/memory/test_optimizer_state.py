"""OptimizerStateOffloader: exact, frees exactly the state's device bytes, reuses its buffers."""

import copy

import pytest
import torch
from torch import nn

from torchtitan_upipe.memory import HostMemory, OptimizerStateOffloader
from torchtitan_upipe.tools.estimate.fake_world import Counted
from torchtitan_upipe.tools.memtrack import LiveTensorTracker

CPU = torch.device("cpu")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _train(model, opt, steps, offloader=None):
    torch.manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        if offloader is not None:
            offloader.offload()
        model(torch.randn(4, 6, dtype=torch.float64)).square().sum().backward()
        opt.step()


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_training_is_exact(name):
    ref, model = _model(), _model()
    cls = getattr(torch.optim, name)
    ref_opt, opt = cls(ref.parameters(), lr=0.1), cls(model.parameters(), lr=0.1)
    offloader = OptimizerStateOffloader([opt], CPU, HostMemory(pinned=False))
    opt.register_step_pre_hook(lambda *_: offloader.reload())
    _train(ref, ref_opt, 4)
    _train(model, opt, 4, offloader)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    sd, ref_sd = opt.state_dict(), ref_opt.state_dict()  # what a checkpoint saves
    for k in ref_sd["state"]:
        for name_, v in ref_sd["state"][k].items():
            assert torch.equal(sd["state"][k][name_], v), name_


def test_offload_frees_exactly_the_state_and_reuses_its_buffers():
    """On real tensors; the host buffers are kept out of the count as the estimator does."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    n_params = sum(p.numel() for p in model.parameters())
    state_bytes = 2 * 8 * n_params  # exp_avg and exp_avg_sq, float64 here
    counted = Counted(fake=False)
    offloader = OptimizerStateOffloader([opt], CPU, HostMemory(
        pinned=False, allocate=counted.allocate_host))
    with LiveTensorTracker(ignore=counted.ignore) as t:
        _train(model, opt, 1)  # creates the state
        saved = copy.deepcopy(opt.state_dict())
        before = t.live_bytes
        offloader.offload()
        freed = before - t.live_bytes
        offloader.offload()  # a no-op
        assert before - t.live_bytes == freed
        offloader.reload()
        regrown = t.live_bytes - before + freed
    assert freed == state_bytes and regrown == state_bytes
    assert offloader.host_bytes() == state_bytes
    for k, state in saved["state"].items():  # the steps (scalars) stayed, the rest came back
        for name, v in state.items():
            assert torch.equal(opt.state_dict()["state"][k][name], v), name
    buffers = {id(b) for b in offloader._host.values()}
    offloader.offload()
    offloader.reload()
    assert {id(b) for b in offloader._host.values()} == buffers  # reused, not re-made


def test_nothing_to_offload_before_the_first_step():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    offloader = OptimizerStateOffloader([opt], CPU, HostMemory(pinned=False))
    offloader.offload()
    offloader.reload()
    assert offloader.host_bytes() == 0


def test_a_view_of_a_larger_storage_is_refused():
    p = nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([p], lr=0.1)
    opt.state[p]["buf"] = torch.zeros(8)[:4]
    offloader = OptimizerStateOffloader([opt], CPU, HostMemory(pinned=False))
    with pytest.raises(ValueError, match="'buf' does not cover its storage"):
        offloader.offload()
