"""Every TOML in train_configs/ parses with TorchTitan's ConfigManager and validates.

The world size of each config is the product of its parallel degrees; GPU configs (those
whose header names H100 hardware) are validated as on a CUDA machine, the CPU debug configs
as on this one.
"""

import glob
import os
import re

import pytest

from tests.helpers.paths import ROOT

import torchtitan_upipe.train_spec  # noqa: F401
from torchtitan.config import ConfigManager
from torchtitan_upipe.titan.checks import validate_job_config

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "train_configs", "*.toml")))


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


DEBUG = [p for p in CONFIGS if "_debug_" in os.path.basename(p)]


@pytest.mark.parametrize("path", DEBUG, ids=os.path.basename)
def test_debug_configs_are_seeded_and_their_gpu_advice_validates(path):
    """Two runs of a debug config print the same losses (a fixed seed), and what a header
    says about GPUs is true: every override it names validates on a CUDA machine."""
    cfg = ConfigManager().parse_args(["--job.config_file", path])
    assert cfg.debug.seed is not None
    header = " ".join(open(path).read().split("\n[", 1)[0].replace("#", " ").split())
    world = max(cfg.parallelism.context_parallel_degree, 1)
    if "GPU" not in header:
        return
    overrides = re.findall(r"On GPUs add (--\S+ \S+)", header)
    assert overrides, f"the header mentions GPUs without saying what they need: {header!r}"
    cuda = ConfigManager().parse_args(["--job.config_file", path, *overrides[0].split()])
    validate_job_config(cuda, world_size=world, cuda=True)


SIMULATED = [p for p in CONFIGS if "xh100" in os.path.basename(p) and "_ring" not in os.path.basename(p)]


@pytest.mark.slow
@pytest.mark.parametrize("path", SIMULATED, ids=os.path.basename)
def test_gpu_config_runs_one_step_in_the_one_rank_simulation(path, tmp_path):
    """Each 8/16-GPU config (its degrees, 2-D CP mesh, style and memory stack) runs a step as
    rank 0 of its job under TorchTitan's fake backend on CPU, with the debug model standing in
    for the flavor and a short sequence; style "ring" needs CUDA and is validated above."""
    import re
    import subprocess
    import sys

    cfg = ConfigManager().parse_args(["--job.config_file", path])
    world = cfg.parallelism.context_parallel_degree
    root = ROOT
    cmd = [sys.executable, os.path.join(root, "train.py"), "--job.config_file", path,
           "--comm.mode", "fake_backend", "--model.flavor", "debugmodel", "--training.seq_len", "2048",
           "--training.steps", "1", "--job.dump_folder", str(tmp_path)]
    env = dict(os.environ, NGPU=str(world), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    applied = re.search(r"Applied context_parallel.style='(\w+)' \(degree (\d+) = all-to-all (\d+) x ring (\d+)", out)
    assert applied, out[-3000:]
    style, degree, u, r = applied.group(1), *map(int, applied.groups()[1:])
    assert (style, degree) == (cfg.context_parallel.style, world)
    assert u * r == degree and u == (cfg.context_parallel.ulysses_degree or world)
    assert "step:  1" in out
