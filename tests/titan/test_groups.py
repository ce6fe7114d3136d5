"""The CP process groups: the (ring, ulysses) grid over the CP ranks."""

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from tests.helpers.dist import run_distributed
from torchtitan_upipe.titan.groups import CPGroups, build_cp_groups


def _grid(rank, world):
    cp_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    for u in (4, 2, 1):
        groups = build_cp_groups(cp_mesh, u)
        r = world // u
        assert (groups.ulysses_degree, groups.ring_degree) == (u, r)
        assert groups.ring_rank * u + groups.ulysses_rank == rank  # the Ulysses dimension innermost
        if u > 1:
            assert dist.get_world_size(groups.ulysses) == u
            members = [dist.get_global_rank(groups.ulysses, i) for i in range(u)]
            assert members == list(range(groups.ring_rank * u, (groups.ring_rank + 1) * u))
        else:
            assert groups.ulysses is None
        if r > 1:
            members = [dist.get_global_rank(groups.ring, i) for i in range(r)]
            assert members == [groups.ulysses_rank + j * u for j in range(r)]  # ranks u apart
        else:
            assert groups.ring is None


def test_groups_of_a_4_rank_cp_mesh():
    run_distributed(_grid, 4)


def test_no_cp_is_one_local_rank():
    assert CPGroups.local() == CPGroups(None, None, 1, 1, 0, 0)
