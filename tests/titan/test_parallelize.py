"""The parallelize hook on 2 gloo ranks: the plan's groups, strategies and offloader end up in
the model, in TorchTitan's order, and the parameter FQNs stay TorchTitan's."""

from __future__ import annotations

import os

from tests.helpers.dist import run_distributed
from tests.helpers.paths import CONFIGS


def _parallelize(rank, world, config, style):
    from torchtitan_upipe.titan.cpu_compat import cpu_compat

    with cpu_compat():  # TorchTitan reads the device type when it is first imported
        import torch
        from torchtitan.config import ConfigManager
        from torchtitan.distributed import ParallelDims

        import torchtitan_upipe.train_spec  # noqa: F401
        from torchtitan_upipe.titan.attention import ContextParallelAttention, UPipeStrategy
        from torchtitan_upipe.titan.llama3 import FLAVORS, Transformer
        from torchtitan_upipe.titan.memory_stack import ChunkedLossOutput, TiledFeedForward
        from torchtitan_upipe.titan.parallelize import CPPlan, parallelize_llama_cp

        job = ConfigManager().parse_args(["--job.config_file", os.path.join(CONFIGS, config),
                                          "--context_parallel.style", style])
        dims = ParallelDims(dp_shard=-1, dp_replicate=1, cp=2, tp=1, pp=1, ep=1, etp=1,
                            world_size=world)
        plan = CPPlan.build(job, dims)
        with torch.device("meta"):
            model = Transformer(FLAVORS["debugmodel"])
        keys = list(model.state_dict())
        model = parallelize_llama_cp(model, dims, job, plan=plan)
        assert list(model.state_dict()) == keys  # canonical FQNs through every wrapper

        assert plan.shape.cp == 2 and plan.groups.ulysses_degree == 2
        assert plan.groups.ulysses_rank == rank and plan.sharder.rank == rank
        for block in model.layers.values():
            attention = block.attention
            assert isinstance(attention, ContextParallelAttention)
            assert attention.strategy.groups is plan.groups
            assert isinstance(attention.strategy, UPipeStrategy) == (style == "upipe")
            assert isinstance(block.feed_forward, TiledFeedForward)
        assert isinstance(model.output, ChunkedLossOutput)
        assert plan.offloader is not None and plan.offloader.host_bytes() == 0  # nothing run yet


def test_parallelize_installs_the_plan():
    for style in ("upipe", "ulysses"):
        run_distributed(_parallelize, 2, "llama3_debug_upipe_memory.toml", style)
