"""TorchTitan's trainer with this plugin's config checks and sequence sharding.

:class:`UPipeTrainer` changes three things in ``torchtitan.train.Trainer``:

1. it validates the ``[context_parallel]`` and ``[memory]`` options (and the degrees, model
   and device they imply) before TorchTitan initializes distributed or builds anything;
2. for Ulysses-family styles it shards inputs, labels and RoPE positions with the style's
   :class:`~torchtitan_upipe.sharding.SequenceSharder` instead of TorchTitan's head-tail
   load balancer (which is kept for ``style = "ring"``);
3. with ``memory.chunked_loss`` it hands each batch's (sharded) labels to the model's output
   layer, which then returns the loss sum instead of the logits.

Loss normalization is TorchTitan's: the valid-token count is taken on the unsharded labels
and summed over the data-parallel ranks, each CP rank divides its local loss sum by it, and
the logged loss is summed over data-parallel x CP ranks, so a CP run reports the same loss
as a single-device run.

With ``comm.mode = "fake_backend"`` (one real rank of an NGPU-rank job, collectives no-ops:
``scripts/bench_one_rank.py``) it is rank ``benchmark.fake_rank`` of the job, where TorchTitan
always makes it rank 0 (:func:`fake_group_as`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torchtitan.train import Trainer

from .config import ULYSSES_FAMILY
from .groups import cp_groups
from .sharding import SequenceSharder, sharder_for
from .checks import validate_job_config


class UPipeTrainer(Trainer):
    def __init__(self, job_config) -> None:
        if not hasattr(job_config, "context_parallel"):
            raise ValueError(
                "the [context_parallel] section is missing: set job.custom_config_module = "
                "'torchtitan_upipe.config' (in [job] of the TOML or on the command line)"
            )
        validate_job_config(job_config)
        self._sharder: SequenceSharder | None = None
        super().__init__(job_config)

    def init_distributed(self):
        if self.job_config.comm.mode != "fake_backend":
            return super().init_distributed()
        with fake_group_as(self.job_config.benchmark.fake_rank):
            return super().init_distributed()

    @property
    def sequence_sharder(self) -> SequenceSharder:
        if self._sharder is None:
            groups = cp_groups(self.parallel_dims, self.job_config.context_parallel.ulysses_degree)
            self._sharder = sharder_for(groups)
        return self._sharder

    def post_dataloading_process(
        self, input_dict: dict[str, torch.Tensor], labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        style = self.job_config.context_parallel.style
        if self.parallel_dims.cp_enabled and style in ULYSSES_FAMILY:
            inputs = input_dict["input"]
            extra_inputs = {k: v for k, v in input_dict.items() if k != "input"}
            sharder = self.sequence_sharder
            positions = sharder.positions(inputs.shape[0], inputs.shape[1], inputs.device)
            inputs, labels = sharder.shard(inputs), sharder.shard(labels)
            extra_kwargs: dict[str, Any] = {"positions": positions}
        else:
            inputs, labels, extra_inputs, extra_kwargs = super().post_dataloading_process(
                input_dict, labels
            )
        if self.job_config.memory.chunked_loss:
            self.model_parts[0].output.set_labels(labels)
        return inputs, labels, extra_inputs, extra_kwargs


@contextlib.contextmanager
def fake_group_as(rank: int):
    """While active, TorchTitan's fake process group makes this process ``rank`` (not 0)."""
    import torch.distributed as dist
    from torchtitan.distributed import utils

    original = utils.init_fake_mode

    def init_fake_mode(world_size: int, comm_mode: str = "fake_backend"):
        if comm_mode != "fake_backend":
            return original(world_size, comm_mode)
        dist.init_process_group("fake", rank=rank, world_size=world_size)

    utils.init_fake_mode = init_fake_mode
    try:
        yield
    finally:
        utils.init_fake_mode = original
