"""LiveTensorTracker: the dispatcher-level byte counter the estimator and the memory tests use."""

from __future__ import annotations

import inspect

import pytest
import torch

from tests.helpers.dist import run_distributed
from torchtitan_upipe.tools.memtrack import LiveTensorTracker


def _dtensor_bytes(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    full = torch.randn(64, 16)
    with LiveTensorTracker() as tracker:
        dt = distribute_tensor(full, mesh, [Shard(0)])
        doubled = dt * 2  # a DTensor op: its local result is made below the tracker's mode
        assert tracker.live_bytes == 2 * (64 // world_size) * 16 * 4
        del doubled
        torch.empty(0)  # any op refreshes the count
        assert tracker.live_bytes == (64 // world_size) * 16 * 4
        module = torch.nn.Linear(16, 8, device="meta")
        module.to_empty(device="cpu")  # swaps the parameters: no weak references to tensors
    assert tracker.peak_bytes >= 2 * (64 // world_size) * 16 * 4


def test_tracker_counts_the_local_tensors_of_dtensors():
    run_distributed(_dtensor_bytes, 2)


def test_tracker_counts_fake_tensors_by_storage():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), LiveTensorTracker() as tracker:
        a = torch.empty(1000, dtype=torch.float32)
        view = a.view(10, 100)  # the same storage: counted once
        b = torch.empty(500, dtype=torch.bfloat16)
        assert tracker.live_bytes == 4000 + 1000
        del a, b
        torch.empty(0)
        assert tracker.live_bytes == 4000  # the view keeps the storage alive
        del view
        torch.empty(0)
        assert tracker.live_bytes == 0
    assert tracker.peak_bytes == 5000


def test_breakdown_names_what_is_alive_at_the_peak():
    from torchtitan_upipe.titan import sharding

    x = torch.randn(1000, requires_grad=True)
    with LiveTensorTracker(attribute=True) as tracker:
        y = x.exp()  # saved for the backward: alive with mul's output at the peak
        z = y * 2
        idx = sharding.ContiguousSharder(rank=1, degree=2).indices(4000)  # int64, 16000 bytes
        del y, z
        after = torch.empty(10)  # made after the peak: not in its breakdown
        rows = tracker.peak_breakdown()
    assert tracker.peak_bytes == 24000 and sum(r[1] for r in rows) == tracker.peak_bytes
    source = inspect.getsourcelines(sharding.ContiguousSharder.indices)
    line = source[1] + next(i for i, t in enumerate(source[0]) if "torch.arange" in t)
    assert rows == [(f"arange @ torchtitan_upipe/titan/sharding.py:{line} indices", 16000, 1),
                    ("exp @ ?", 4000, 1), ("mul @ ?", 4000, 1)]  # tests/ is not a source
    del idx, after


def test_breakdown_labels_backward_ops_with_their_autograd_node():
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(8, 64)
    with LiveTensorTracker(attribute=True) as tracker:
        (x @ w).sum().backward()
        rows = tracker.peak_breakdown()
    assert any("[MmBackward0]" in label for label, _, _ in rows), rows
    tracker.reset_peak()
    assert tracker.peak_bytes == tracker.live_bytes
    assert sum(r[1] for r in tracker.peak_breakdown()) == tracker.live_bytes


def test_breakdown_needs_attribution():
    with LiveTensorTracker() as tracker, pytest.raises(RuntimeError, match="attribute=True"):
        tracker.peak_breakdown()


def _exp_workspace(func, args):
    return 1000 if func is torch.ops.aten.exp.default else 0


def test_a_workspace_counts_only_while_its_op_runs():
    with LiveTensorTracker(workspace=_exp_workspace, attribute=True) as tracker:
        a = torch.empty(1000)
        b = a.exp()  # a, b and exp's workspace: 9000 bytes at once
        assert tracker.peak_bytes == 9000 and tracker.live_bytes == 8000
        rows = tracker.peak_breakdown()
        assert ("exp workspace (modelled)", 1000, 0) in rows
        assert sum(r[1] for r in rows) == 9000
        del a, b
        big = torch.empty(5000)  # a higher peak without any workspace: nothing added to it
        assert tracker.peak_bytes == 20000 and tracker.workspace_peak == 1000
        assert all("workspace" not in r[0] for r in tracker.peak_breakdown())
        del big


def test_nested_trackers_both_see_storage_resizes_and_restore_resize():
    original = torch.UntypedStorage.resize_
    with LiveTensorTracker() as outer:
        a = torch.empty(1000)  # 4000 bytes
        with LiveTensorTracker() as inner:
            a.untyped_storage().resize_(0)  # FSDP2 frees its buffers this way
            assert inner.live_bytes == 0 and outer.live_bytes == 0
            a.untyped_storage().resize_(8000)
            assert outer.live_bytes == 8000
        assert torch.UntypedStorage.resize_ is not original  # the outer tracker's route
        del a
    assert torch.UntypedStorage.resize_ is original


def test_a_dead_weak_proxy_in_the_process_does_not_stop_the_tracker():
    import weakref

    class _Referent:
        pass

    referent = _Referent()
    holder = [weakref.proxy(referent)]  # a container the gc tracks, holding the proxy
    del referent  # the proxy is dead: isinstance() on it raises ReferenceError
    with LiveTensorTracker() as tracker:
        t = torch.empty(10)
    assert tracker.peak_bytes >= t.untyped_storage().nbytes()
    assert len(holder) == 1
