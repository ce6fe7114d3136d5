"""Spawn ``world_size`` gloo ranks inside a pytest process and run a function on each.

The function must be importable (module level) because ranks are started with ``spawn``.
An exception on any rank fails the test with that rank's traceback.  Tests amortize the
start-up cost (about a second per rank on a 2-core machine) by looping over a whole grid of
cases inside one spawned group.
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, store_file: str, fn, args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store_file}",  # no TCP port to race for
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=120),
    )
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; raise on any failure."""
    with tempfile.TemporaryDirectory(prefix="upipe_dist_") as d:
        store = os.path.join(d, "store")
        mp.spawn(_worker, args=(world_size, store, fn, args), nprocs=world_size, join=True)
