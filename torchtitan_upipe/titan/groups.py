"""The context-parallel process groups: one all-to-all (Ulysses) group x one ring group.

The CP ranks ``0..C-1`` form a ``(ring, ulysses)`` grid with the Ulysses dimension innermost,
so an all-to-all group is ``u`` consecutive ranks (one node's NVLink domain) and the ring
runs across groups (across nodes)::

    C = 16, u = 8, R = 2:   cp rank = ring_rank * 8 + ulysses_rank
        ulysses groups: {0..7}, {8..15}          ring groups: {0, 8}, {1, 9}, ..., {7, 15}

``u = C`` is pure Ulysses/UPipe (no ring group); ``u = 1`` is a pure ring (no all-to-all).
The groups are created once per :class:`~torchtitan.distributed.ParallelDims` (collectively,
by every rank) and kept on it, next to TorchTitan's own meshes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed import ProcessGroup


@dataclass(frozen=True)
class CPGroups:
    ulysses: ProcessGroup | None
    ring: ProcessGroup | None
    ulysses_degree: int
    ring_degree: int
    ulysses_rank: int
    ring_rank: int


def cp_groups(parallel_dims, ulysses_degree: int) -> CPGroups:
    """The (memoized) CP groups of ``parallel_dims`` for an all-to-all group of ``ulysses_degree``
    (0 = the whole CP degree)."""
    cached = getattr(parallel_dims, "_upipe_cp_groups", None)
    if cached is not None:
        return cached
    cp_mesh = parallel_dims.get_mesh("cp")
    c = cp_mesh.size()
    u = ulysses_degree or c
    r = c // u
    rank = cp_mesh.get_local_rank()
    if r == 1:
        groups = CPGroups(cp_mesh.get_group(), None, u, 1, rank, 0)
    elif u == 1:
        groups = CPGroups(None, cp_mesh.get_group(), 1, r, 0, rank)
    else:
        mesh2d = cp_mesh._unflatten(0, (r, u), ("cp_ring", "cp_ulysses"))
        groups = CPGroups(
            mesh2d["cp_ulysses"].get_group(), mesh2d["cp_ring"].get_group(),
            u, r, rank % u, rank // u,
        )
    parallel_dims._upipe_cp_groups = groups
    return groups
