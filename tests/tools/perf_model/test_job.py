"""train.py's options to the performance models' inputs (torchtitan_upipe.tools.perf_model.job)."""

import os

import torchtitan_upipe.train_spec  # noqa: F401  (registers upipe_llama3)
from tests.helpers.paths import CONFIGS
from torchtitan.config import ConfigManager
from torchtitan_upipe.tools.perf_model import memory as mm
from torchtitan_upipe.tools.perf_model.job import element_bytes, memory_setup


def test_memory_setup_is_the_configs_job():
    path = os.path.join(CONFIGS, "llama3_8b_8xh100_upipe.toml")
    job = ConfigManager().parse_args(["--job.config_file", path, "--training.seq_len", "3145728",
                                      "--memory.no-offload-prefetch"])
    st = memory_setup(job, world=8)
    want = mm.replace(mm.stack(mm.from_flavor("8B", seq_len=3 << 20, cp=8, world=8, style="upipe",
                                              chunk_heads=8)), offload_prefetch=False)
    assert st == want
    assert (st.act_bytes, st.reduce_bytes) == (2, 4)
    two = ConfigManager().parse_args(["--job.config_file", path, "--benchmark.n_layers", "2"])
    assert memory_setup(two, world=8).n_layers == 2


def test_element_bytes():
    assert element_bytes("float32") == 4
    assert element_bytes("bfloat16") == element_bytes("float16") == 2
