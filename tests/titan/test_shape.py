"""JobShape and ModelShape: the one place the job's derived quantities are computed."""

from __future__ import annotations

import os

import pytest
import torch

import torchtitan_upipe.train_spec  # noqa: F401  (registers upipe_llama3)
from tests.helpers.paths import CONFIGS
from torchtitan.config import ConfigManager
from torchtitan_upipe.cp.upipe.schedule import UPipeSchedule
from torchtitan_upipe.titan.llama3 import FLAVORS, Transformer
from torchtitan_upipe.titan.shape import JobShape, ModelShape


def test_model_shape_is_the_built_model():
    """The MLP width and the parameter counts are those of the modules TorchTitan builds."""
    for flavor in ("debugmodel", "8B", "32B", "70B"):
        args = FLAVORS[flavor]
        with torch.device("meta"):
            model = Transformer(args)
        shape = ModelShape.from_flavor(flavor)
        block = model.layers["0"]
        assert block.feed_forward.w1.weight.shape == (shape.ffn_hidden, shape.dim), flavor
        assert block.attention.wq.weight.shape == (shape.n_heads * shape.head_dim, shape.dim)
        assert sum(p.numel() for p in block.parameters()) == shape.block_params
        assert model.tok_embeddings.weight.numel() == shape.embedding_params
        assert model.output.weight.numel() + model.norm.weight.numel() == shape.output_params
        assert sum(p.numel() for p in model.parameters()) == shape.total_params
    assert ModelShape.from_flavor("8B", n_layers=2).n_layers == 2


# style, cp, ulysses_degree, upipe_chunk_heads -> u, R, U
LAYOUTS = [
    ("none", 1, 0, 0, 1, 1, 0),
    ("ring", 8, 0, 0, 1, 8, 0),
    ("ring", 16, 8, 0, 1, 16, 0),  # TorchTitan's ring ignores the hybrids' options
    ("ulysses", 8, 0, 0, 8, 1, 0),
    ("ulysses", 4, 2, 0, 2, 2, 0),  # resolved as given; the ulysses style's check rejects R > 1
    ("usp", 16, 8, 0, 8, 2, 0),
    ("usp", 8, 1, 0, 1, 8, 0),
    ("upipe", 8, 0, 0, 8, 1, 8),
    ("upipe", 8, 0, 16, 8, 1, 16),
    ("upipe", 16, 8, 0, 8, 2, 8),
]


@pytest.mark.parametrize("style,cp,ulysses_degree,chunk_heads,u,r,big_u", LAYOUTS)
def test_layout_resolution(style, cp, ulysses_degree, chunk_heads, u, r, big_u):
    shape = JobShape.from_flavor("8B", 1 << 20, style=style, cp=cp, ulysses_degree=ulysses_degree,
                                 chunk_heads=chunk_heads, batch=2)
    assert (shape.ulysses, shape.ring, shape.chunk_heads) == (u, r, big_u)
    assert shape.world == cp and shape.local_seq == (1 << 20) // cp
    assert shape.local_tokens == 2 * shape.local_seq
    assert shape.builtin_ring == (style == "ring")
    if big_u:
        assert shape.schedule == UPipeSchedule(32, 8, u, big_u)
    else:
        assert shape.schedule is None


def test_replication_and_errors_come_from_the_head_rules():
    assert JobShape.from_flavor("8B", 1 << 20, style="ulysses", cp=16).rho == 2
    assert JobShape.from_flavor("8B", 1 << 20, style="upipe", cp=8).rho == 1
    bad = JobShape.from_flavor("debugmodel", 1024, style="upipe", cp=2, chunk_heads=3)
    with pytest.raises(ValueError, match="upipe_chunk_heads=3"):
        bad.schedule
    with pytest.raises(ValueError, match="not divisible by the all-to-all degree 3"):
        JobShape.from_flavor("debugmodel", 1024, style="ulysses", cp=3).rho


def test_from_job_config_is_the_configs_job():
    path = os.path.join(CONFIGS, "llama3_32b_16xh100_upipe.toml")
    job = ConfigManager().parse_args(["--job.config_file", path, "--training.seq_len", "2097152",
                                      "--benchmark.n_layers", "2"])
    shape = JobShape.from_job_config(job, world=16)
    assert shape == JobShape.build(ModelShape.from_flavor("32B", n_layers=2), 2 << 20, "upipe",
                                   16, 8, job.context_parallel.upipe_chunk_heads, 1, 16)
    assert (shape.ulysses, shape.ring, shape.chunk_heads) == (8, 2, 8)
    assert shape.with_layers(64).model == ModelShape.from_flavor("32B")
