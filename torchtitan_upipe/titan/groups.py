"""The context-parallel process groups: one all-to-all (Ulysses) group x one ring group.

The CP ranks ``0..C-1`` form a ``(ring, ulysses)`` grid with the Ulysses dimension innermost,
so an all-to-all group is ``u`` consecutive ranks (one node's NVLink domain) and the ring
runs across groups (across nodes)::

    C = 16, u = 8, R = 2:   cp rank = ring_rank * 8 + ulysses_rank
        ulysses groups: {0..7}, {8..15}          ring groups: {0, 8}, {1, 9}, ..., {7, 15}

``u = C`` is pure Ulysses/UPipe (no ring group); ``u = 1`` is a pure ring (no all-to-all).
The trainer builds the groups once, collectively on every rank, right after TorchTitan's
meshes (:class:`~.parallelize.CPPlan`), and hands them to the parallelize hook and the
sequence sharder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh


@dataclass(frozen=True)
class CPGroups:
    """This rank's all-to-all and ring groups, their sizes and its ranks in them."""

    ulysses: ProcessGroup | None
    ring: ProcessGroup | None
    ulysses_degree: int
    ring_degree: int
    ulysses_rank: int
    ring_rank: int

    @classmethod
    def local(cls) -> CPGroups:
        """No context parallelism: no groups, one rank."""
        return cls(None, None, 1, 1, 0, 0)


def build_cp_groups(cp_mesh: DeviceMesh, ulysses_degree: int) -> CPGroups:
    """The CP groups of ``cp_mesh`` (``C`` ranks) for an all-to-all group of ``ulysses_degree``
    ranks (``u``, resolved: :attr:`~.shape.JobShape.ulysses`).  Collective: every CP rank calls
    it, in the same order."""
    c = cp_mesh.size()
    u = ulysses_degree
    r = c // u
    rank = cp_mesh.get_local_rank()
    if r == 1:
        return CPGroups(cp_mesh.get_group(), None, u, 1, rank, 0)
    if u == 1:
        return CPGroups(None, cp_mesh.get_group(), 1, r, 0, rank)
    mesh2d = cp_mesh._unflatten(0, (r, u), ("cp_ring", "cp_ulysses"))
    return CPGroups(
        mesh2d["cp_ulysses"].get_group(), mesh2d["cp_ring"].get_group(),
        u, r, rank % u, rank // u,
    )


def process_group_count() -> int:
    """Process groups this process has created so far (the default group included); constant
    once the trainer is built: every group is made once, before the first step."""
    if not dist.is_initialized():
        return 0
    return len(dist.distributed_c10d._world.pg_map)
