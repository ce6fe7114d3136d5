"""TorchTitan's trainer with this plugin's config checks, process groups and sequence sharding.

:class:`UPipeTrainer` changes seven things in ``torchtitan.train.Trainer``:

1. it validates the ``[context_parallel]`` and ``[memory]`` options (and the degrees, model
   and device they imply) before TorchTitan initializes distributed or builds anything;
2. right after TorchTitan's meshes it builds the job's :class:`~.parallelize.CPPlan` (shape,
   style, CP process groups, sharder, host offloader) and hands it to the parallelize hook;
3. for the all-to-all styles it shards inputs, labels and RoPE positions with the style's
   :class:`~.sharding.SequenceSharder` instead of TorchTitan's head-tail load balancer (which
   is kept for ``style = "ring"``);
4. with ``memory.chunked_loss`` it hands each batch's (sharded) labels to the model's output
   layer, which then returns the loss sum instead of the logits;
5. it checks the checkpoint a run will resume from before anything is loaded (a weights-only
   save, a changed LR schedule: :mod:`.resume`), and every checkpoint it saves carries the
   schedule and the token count (:class:`~.resume.RunRecord`);
6. it counts each token of the global batch once (``n_tokens_seen``), where TorchTitan sums
   each rank's count and so counts a token once per CP rank;
7. with ``context_parallel.pad_seq_len`` it pads each sample to the length the layout can
   split (:func:`pad_to`), before sharding.

Loss normalization is TorchTitan's: the valid-token count is taken on the unsharded labels
and summed over the data-parallel ranks, each CP rank divides its local loss sum by it, and
the logged loss is summed over data-parallel x CP ranks, so a CP run reports the same loss
as a single-device run.

With ``comm.mode = "fake_backend"`` (one real rank of an NGPU-rank job, collectives no-ops:
``scripts/bench_one_rank.py``) it is rank ``benchmark.fake_rank`` of the job, where TorchTitan
always makes it rank 0 (:func:`~.fake_rank.fake_group_as`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake
from torchtitan.tools.logging import logger
from torchtitan.train import Trainer

from ..cp.documents import DocumentKernel, Documents
from ..cp.kernels import get_kernel
from ..memory import OptimizerStateOffloader
from ..memory.host import Allocate
from .checks import validate_job_config
from .fake_rank import fake_group_as
from .metrics import CPMetricsProcessor
from .parallelize import CPPlan, parallelize_llama_cp
from .resume import RECORD, RunRecord, check_resume, rebuild_schedule
from .styles import documents_of


def _note_layout_dependent_init(job_config, parallel_dims) -> None:
    """On CPU, DTensor's RNG is per rank: each rank initializes its own FSDP shards, so the
    initial weights depend on the world size. Say so once, with the remedy."""
    ckpt = job_config.checkpoint
    if (torch.cuda.is_available() or parallel_dims.world_size == 1
            or (ckpt.enable and ckpt.initial_load_path) or job_config.comm.mode != "default"):
        return
    logger.info("Initial weights depend on the world size on CPU (each rank initializes its own "
                "shards): to compare layouts step by step, start every run from one seed "
                "checkpoint (README: Reproducible runs)")


def memory_fraction(cap_gib: float, total_bytes: int) -> float | None:
    """The fraction of a device of ``total_bytes`` that ``cap_gib`` GiB is, or ``None`` when it
    caps nothing (0, or at least the whole device)."""
    cap = cap_gib * 2**30
    return cap / total_bytes if 0 < cap < total_bytes else None


def cap_device_memory(cap_gib: float) -> float | None:
    """Cap this process's CUDA memory (``benchmark.device_memory_gib``); return the fraction."""
    if not cap_gib or not torch.cuda.is_available():
        return None
    device = int(os.environ.get("LOCAL_RANK", "0"))
    props = torch.cuda.get_device_properties(device)
    fraction = memory_fraction(cap_gib, props.total_memory)
    if fraction is None:
        logger.info(f"benchmark.device_memory_gib={cap_gib:g} is at least the "
                    f"{props.total_memory / 2**30:.2f} GiB of {props.name}: no cap")
        return None
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    logger.info(f"Capped CUDA memory to {cap_gib:g} GiB ({fraction:.3f} of {props.name}'s "
                f"{props.total_memory / 2**30:.2f} GiB): benchmark.device_memory_gib")
    return fraction


def pad_to(seq_len: int, input_dict: dict[str, torch.Tensor], labels: torch.Tensor):
    """``context_parallel.pad_seq_len``: the batch's ``(B, S)`` inputs and labels padded at the
    end to ``seq_len`` (the model's, :func:`~.shape.model_seq_len`): inputs with token 0,
    labels with the loss's ignore index. The padding comes after every real token, so causal
    attention keeps it out of the real tokens' attention, and the loss (whose token count
    TorchTitan takes before this hook) ignores it. Unchanged when already ``seq_len`` long."""
    pad = seq_len - labels.shape[1]
    if pad <= 0:
        return input_dict, labels
    from ..memory import IGNORE_INDEX

    inputs = torch.nn.functional.pad(input_dict["input"], (0, pad), value=0)
    return {**input_dict, "input": inputs}, torch.nn.functional.pad(labels, (0, pad),
                                                                     value=IGNORE_INDEX)


class UPipeTrainer(Trainer):
    """``inline_upipe`` and ``host_allocate`` are for the CPU memory estimator (see
    :class:`~.parallelize.CPPlan` and :class:`~torchtitan_upipe.memory.HostMemory`)."""

    def __init__(self, job_config, *, inline_upipe: bool = False,
                 host_allocate: Allocate | None = None) -> None:
        if not hasattr(job_config, "context_parallel"):
            raise ValueError(
                "the [context_parallel] section is missing: set job.custom_config_module = "
                "'torchtitan_upipe.config' (in [job] of the TOML or on the command line)"
            )
        validate_job_config(job_config)
        cap_device_memory(job_config.benchmark.device_memory_gib)  # before any allocation
        self._plan_options = {"inline_upipe": inline_upipe, "host_allocate": host_allocate}
        self.plan: CPPlan | None = None
        self.tokens_seen = 0  # each token of the global batch once (TorchTitan's: once per rank)
        self._documents_logged = False
        super().__init__(job_config)
        self.optimizer_offloader = None
        if job_config.memory.offload_optimizer_state:  # validated: Adam(W), not in backward
            offloader = OptimizerStateOffloader(self.optimizers, self.device,
                                                self.plan.host_memory)
            self.optimizers.register_step_pre_hook(lambda *_: offloader.reload())
            self.optimizer_offloader = offloader
        if isinstance(self.metrics_processor, CPMetricsProcessor):
            self.metrics_processor.host_offloader = self.plan.offloader
            self.metrics_processor.optimizer_offloader = self.optimizer_offloader
            self.metrics_processor.tokens_seen = lambda: self.tokens_seen
        self.run_record = RunRecord(job_config, lambda: self.tokens_seen)
        self.checkpointer.states[RECORD] = self.run_record
        rebuild = check_resume(self.checkpointer, job_config, self.run_record,
                               lambda: self.checkpointer.states["model"].state_dict())
        self.checkpointer.load = functools.partial(self._load_checkpoint, self.checkpointer.load,
                                                   bool(rebuild))
        _note_layout_dependent_init(job_config, self.parallel_dims)
        if self.plan.shape.seq_len != job_config.training.seq_len:
            s, padded = job_config.training.seq_len, self.plan.shape.seq_len
            logger.info(f"context_parallel.pad_seq_len: each sample of training.seq_len={s} "
                        f"tokens is padded to {padded} ({padded - s} padding tokens, after the "
                        f"real ones: out of their attention, the loss and the token counts)")

    def _load_checkpoint(self, load, rebuild: bool, step: int = -1) -> bool:
        """TorchTitan's ``checkpointer.load`` (checked by :func:`~.resume.check_resume` at
        construction), then the token count and, with ``rebuild``, the new LR schedule."""
        loaded = load(step)
        if loaded and self.step > 0:
            saved = self.run_record.saved
            self.tokens_seen = (saved["tokens_seen"] if saved is not None
                                else self.ntokens_seen * self._data_parallel_degree())
            if rebuild:
                rebuild_schedule(self.lr_schedulers, self.job_config)
        return loaded

    def forward_backward_step(self, *args, **kwargs):
        """TorchTitan's, with ``memory.offload_optimizer_state`` the optimizer's state in host
        memory from here to the optimizer step (its pre-hook reloads it).  A checkpoint being
        staged from that state is waited for first."""
        if self.optimizer_offloader is not None:
            self.checkpointer.maybe_wait_for_staging()
            self.optimizer_offloader.offload()
        return super().forward_backward_step(*args, **kwargs)

    def _data_parallel_degree(self) -> int:
        return self.parallel_dims.dp_replicate * self.parallel_dims.dp_shard

    def batch_generator(self, data_iterable):
        dp = self._data_parallel_degree()
        for input_dict, labels in super().batch_generator(data_iterable):
            self.tokens_seen += labels.numel() * dp  # every data-parallel rank's batch is as big
            yield input_dict, labels

    def init_distributed(self):
        if self.job_config.comm.mode != "fake_backend":
            parallel_dims = super().init_distributed()
        else:
            with fake_group_as(self.job_config.benchmark.fake_rank):
                parallel_dims = super().init_distributed()
        self.plan = CPPlan.build(self.job_config, parallel_dims, **self._plan_options)
        return parallel_dims

    # TorchTitan's Trainer.__init__ assigns ``self.train_spec`` from the registry and later
    # calls its ``parallelize_fn(model, parallel_dims, job_config)``; this setter binds the
    # plan built in ``init_distributed`` (before the assignment) to that call.
    @property
    def train_spec(self):
        return self._train_spec

    @train_spec.setter
    def train_spec(self, spec) -> None:
        if spec.parallelize_fn is parallelize_llama_cp:
            spec = dataclasses.replace(
                spec, parallelize_fn=functools.partial(parallelize_llama_cp, plan=self.plan))
        self._train_spec = spec

    def _documents(self, inputs: torch.Tensor) -> Documents | None:
        """The packed documents of the whole (padded) batch, before it is sharded: every CP
        rank holds all of it here, so no boundaries need to be exchanged.  Under the CPU memory
        estimator the tokens are fake (no values): ``None``, causal attention over each row,
        which is one document per row, the most attention work and memory."""
        if is_fake(inputs):
            return None
        eos = self.tokenizer.eos_id if self.tokenizer is not None else self.model_args.eos_id
        docs = Documents.from_tokens(inputs, eos)
        if not self._documents_logged:
            self._documents_logged = True
            kernel = DocumentKernel(get_kernel(self.plan.kernel, self.plan.device), docs)
            how = ("all documents in one varlen call" if kernel.uses_varlen(self.plan.device)
                   else "one call per document")
            logger.info(f"block_causal: the first batch holds {docs.count} documents (longest "
                        f"{docs.max_len} tokens); each is attended to causally on its own by "
                        f"context_parallel.kernel={self.job_config.context_parallel.kernel!r} "
                        f"= {kernel.name!r}, {how}")
        return docs

    def post_dataloading_process(
        self, input_dict: dict[str, torch.Tensor], labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        sharder = self.plan.sharder
        input_dict, labels = pad_to(self.plan.shape.seq_len, input_dict, labels)
        if self.parallel_dims.cp_enabled and sharder is not None:
            inputs = input_dict["input"]
            extra_inputs = {k: v for k, v in input_dict.items() if k != "input"}
            positions = sharder.positions(inputs.shape[0], inputs.shape[1], inputs.device)
            extra_kwargs: dict[str, Any] = {"positions": positions}
            if documents_of(self.model_args):
                extra_kwargs["attention_masks"] = self._documents(inputs)
            inputs, labels = sharder.shard(inputs), sharder.shard(labels)
        else:
            inputs, labels, extra_inputs, extra_kwargs = super().post_dataloading_process(
                input_dict, labels
            )
        if self.job_config.memory.chunked_loss:
            self.model_parts[0].output.set_labels(labels)
        return inputs, labels, extra_inputs, extra_kwargs
