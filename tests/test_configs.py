"""Every TOML in train_configs/ parses with TorchTitan's ConfigManager and validates.

The world size of each config is the product of its parallel degrees; GPU configs (those
whose header names H100 hardware) are validated as on a CUDA machine, the CPU debug configs
as on this one.
"""

import glob
import os

import pytest

import torchtitan_upipe.train_spec  # noqa: F401
from torchtitan.config import ConfigManager
from torchtitan_upipe.validation import validate_job_config

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train_configs", "*.toml")))


def test_the_folder_has_the_paper_configs():
    names = {os.path.basename(p) for p in CONFIGS}
    for style in ("upipe", "ulysses", "ring"):
        assert f"llama3_8b_8xh100_{style}.toml" in names
    for model in ("8b", "32b"):
        for style in ("upipe", "usp", "ring"):
            assert f"llama3_{model}_16xh100_{style}.toml" in names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_parses_and_validates(path):
    header = open(path).read().split("\n[", 1)[0]
    assert "Hardware:" in header, "each config documents its hardware at the top"
    cfg = ConfigManager().parse_args(["--job.config_file", path])
    par = cfg.parallelism
    dp_shard = max(par.data_parallel_shard_degree, 1)
    world = par.context_parallel_degree * dp_shard * par.data_parallel_replicate_degree * par.tensor_parallel_degree
    gpu = "H100" in header
    validate_job_config(cfg, world_size=world, cuda=gpu)
    assert cfg.context_parallel.style in ("none", "ulysses", "upipe", "ring", "usp")
    if gpu:
        # the paper's setup: the whole memory stack, the same for every style
        assert cfg.memory.offload_activations and cfg.memory.tiled_mlp and cfg.memory.chunked_loss
        assert cfg.activation_checkpoint.mode == "full"
        # and every sequence length of the paper's grid validates for it (set on the command line)
        for seq in (131072, 262144, 524288, 1 << 20, 2 << 20, 3 << 20, 4 << 20, 5 << 20, 8 << 20):
            cfg.training.seq_len = seq
            validate_job_config(cfg, world_size=world, cuda=True)
