"""The config sections' own checks: every choice and every count is checked when the section
is built, from TOML or the command line, with a message naming the option."""

import os

import pytest

import torchtitan_upipe.train_spec  # noqa: F401  (registers upipe_llama3)
from tests.helpers.paths import CONFIGS
from torchtitan.config import ConfigManager
from torchtitan_upipe.titan.config import Benchmark, ContextParallel, Memory


def _config(*args, config="llama3_debug_upipe.toml"):
    return ConfigManager().parse_args(["--job.config_file", os.path.join(CONFIGS, config), *args])


def test_unknown_style_and_kernel_name_the_option_and_choices(capsys):
    with pytest.raises(ValueError, match=r"context_parallel.style='ulyses' is not one of \['none', 'ulysses', 'upipe', 'ring', 'usp'\]"):
        ContextParallel(style="ulyses")
    with pytest.raises(ValueError, match=r"context_parallel.kernel='fa3' is not one of"):
        ContextParallel(kernel="fa3")
    with pytest.raises(ValueError, match="context_parallel.upipe_chunk_heads=-1"):
        ContextParallel(upipe_chunk_heads=-1)
    # from the command line, tyro reports our message and exits with status 2
    with pytest.raises(SystemExit):
        _config("--context_parallel.style", "ulyses")
    assert "context_parallel.style='ulyses' is not one" in capsys.readouterr().err.replace("\n", "").replace("│", "").replace("  ", " ")


def test_counts_must_be_non_negative_integers():
    with pytest.raises(ValueError, match=r"benchmark.fake_rank=-1 must be an integer >= 0"):
        Benchmark(fake_rank=-1)
    with pytest.raises(ValueError, match=r"memory.mlp_tiles=-2 must be an integer >= 0"):
        Memory(mlp_tiles=-2)
    with pytest.raises(ValueError, match=r"context_parallel.ulysses_degree=True must be an integer"):
        ContextParallel(ulysses_degree=True)


def test_the_old_import_path_is_the_same_section():
    """TOML configs name ``torchtitan_upipe.config`` as their custom config module."""
    import torchtitan_upipe.config as old

    assert old.JobConfig is __import__("torchtitan_upipe.titan.config", fromlist=["x"]).JobConfig


def test_device_memory_cap_is_a_non_negative_number_and_the_h100_configs_set_80():
    assert Benchmark(device_memory_gib=80).device_memory_gib == 80
    for bad in (-1, True, "80"):
        with pytest.raises(ValueError, match="benchmark.device_memory_gib"):
            Benchmark(device_memory_gib=bad)
    assert _config(config="llama3_8b_8xh100_upipe.toml").benchmark.device_memory_gib == 80
    assert _config().benchmark.device_memory_gib == 0
