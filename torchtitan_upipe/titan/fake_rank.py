"""Be any rank of an N-rank job on one device (TorchTitan's fake process group).

With ``comm.mode = "fake_backend"`` TorchTitan builds one real rank of an ``NGPU``-rank job
whose collectives are no-ops (``scripts/bench_one_rank.py``, the CPU memory estimator), and
always makes it rank 0.  A causal zigzag ring's ranks differ in memory, so a one-rank
measurement must choose its rank: :func:`fake_group_as` makes it ``benchmark.fake_rank``.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def fake_group_as(rank: int):
    """While active, TorchTitan's fake process group makes this process ``rank`` (not 0).

    TorchTitan 0.2.2 hard-codes rank 0 in ``torchtitan.distributed.utils.init_fake_mode``; the
    context replaces that function and restores it on exit."""
    import torch.distributed as dist
    from torchtitan.distributed import utils

    original = utils.init_fake_mode

    def init_fake_mode(world_size: int, comm_mode: str = "fake_backend"):
        if comm_mode != "fake_backend":
            return original(world_size, comm_mode)
        dist.init_process_group("fake", rank=rank, world_size=world_size)

    utils.init_fake_mode = init_fake_mode
    try:
        yield
    finally:
        utils.init_fake_mode = original
