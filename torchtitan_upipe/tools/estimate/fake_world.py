"""The estimator's fake world: what it takes to build and run a trainer on fake tensors.

Each piece is explicit and undone on exit; nothing here is installed for good.

* :class:`Counted` decides which storages the tracker counts: the simulated rank's device
  storages, not the offloaded activations' host buffers (the trainer's
  :class:`~torchtitan_upipe.memory.HostMemory` makes each one through
  :meth:`Counted.allocate_host`, uncounted from the start), not meta tensors, and not the device meshes' rank tables (real
  tensors, built while :attr:`Counted.paused`).
* :func:`estimating_trainer` is :class:`~torchtitan_upipe.titan.trainer.UPipeTrainer` with
  its meshes and CP groups built from real tensors (``DeviceMesh`` reads its rank layout back
  from a tensor, which a fake tensor cannot answer), UPipe inline (a custom op would run only
  its shape function under fake tensors) and the host buffers reported to :class:`Counted`.
* :func:`shape_only_init` lets ``nn.init.trunc_normal_`` draw once (it resamples until its
  values are in range, which fake tensors cannot answer).
* :func:`fa2_workspace` is the tracker's workspace hook: FlashAttention-2's backward
  workspace at each call of the attention backward op.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch._subclasses.fake_tensor import is_fake

from ...titan.memory_model import fa2_backward_workspace_bytes


class Counted:
    """What the tracker counts (see the module docstring)."""

    def __init__(self, fake: bool) -> None:
        self.fake = fake
        self.host: set[int] = set()
        self.paused = False
        self.tracker = None

    def allocate_host(self, make):
        """Make a host buffer (``make()``) without counting it, now or when ops return it
        again (a :data:`~torchtitan_upipe.memory.host.Allocate`)."""
        paused, self.paused = self.paused, True
        try:
            buf = make()
        finally:
            self.paused = paused
        self.host.add(id(buf.untyped_storage()))
        return buf

    def ignore(self, t) -> bool:  # called for every new storage: no import here
        return (self.paused or t.device.type == "meta" or (self.fake and not is_fake(t))
                or id(t.untyped_storage()) in self.host)


def estimating_trainer(job_config, counted: Counted):
    """:class:`UPipeTrainer` for the estimate (rank ``benchmark.fake_rank`` of the job)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from ...titan.trainer import UPipeTrainer

    class EstimatingTrainer(UPipeTrainer):
        def init_distributed(self):
            from torch.distributed.tensor import _random

            counted.paused = True
            with unset_fake_temporarily():
                parallel_dims = super().init_distributed()  # builds the CP groups (the plan)
                parallel_dims.build_mesh()
                # DTensor's RNG tracker reads its offsets back from tensors; random init of
                # fake weights has no values to keep in sync, so run random ops locally
                _random.manual_seed(0, parallel_dims.world_mesh)
                if _random._rng_tracker is not None:
                    _random._rng_tracker.distribute_region_enabled = False
            counted.paused = False
            return parallel_dims

    return EstimatingTrainer(job_config, inline_upipe=True, host_allocate=counted.allocate_host)


@contextlib.contextmanager
def shape_only_init() -> Iterator[None]:
    """Within the block, ``nn.init.trunc_normal_`` draws once (same shapes, same in-place
    write) instead of resampling until its values are in range."""
    from torch.nn import init

    original = init.trunc_normal_

    def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=None):
        return tensor.normal_(mean, std, generator=generator)

    init.trunc_normal_ = trunc_normal_
    try:
        yield
    finally:
        init.trunc_normal_ = original


def fa2_workspace(backward_op):
    """The tracker's workspace hook: FlashAttention-2's backward workspace for a call of
    ``backward_op``, the CPU flash backward (``grad_out, q, k, v, ...`` in ``(B, H, S, D)``);
    0 for any other op.  It runs for every op, so it only compares ``func`` with the op."""

    def workspace(func, args) -> int:
        if func is not backward_op:
            return 0
        q, k = args[1], args[2]
        return fa2_backward_workspace_bytes(q.numel(), q.shape[-1], q.shape[1] != k.shape[1],
                                            q.element_size())

    return workspace
