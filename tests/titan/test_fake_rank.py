"""One process as any rank of an N-rank job on TorchTitan's fake process group."""

import torch.distributed as dist
from torchtitan.distributed import utils

from torchtitan_upipe.titan.fake_rank import fake_group_as


def test_fake_group_is_the_chosen_rank_and_torchtitan_is_restored():
    original = utils.init_fake_mode
    try:
        with fake_group_as(3):
            utils.init_fake_mode(4)
            assert (dist.get_rank(), dist.get_world_size(), dist.get_backend()) == (3, 4, "fake")
        assert utils.init_fake_mode is original
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
