"""The parallelize hook: TorchTitan's order (TP, CP, memory stack, AC, compile, FSDP).

:func:`parallelize_llama_cp` reads like TorchTitan's ``parallelize_llama`` and reuses its
pieces.  It differs in three places: the configured style installs itself in every attention
layer (:meth:`~.styles.CPStyle.install`) with the CP process groups passed explicitly; the
``[memory]`` tiling and chunked loss are applied to the modules in place; and with
``memory.offload_activations`` the block-level checkpointing is the host-offloading one.

What it needs beyond TorchTitan's ``(model, parallel_dims, job_config)`` is a
:class:`CPPlan`: the job's shape, style, process groups, sharder and host offloader.
:class:`~.trainer.UPipeTrainer` builds one right after TorchTitan's meshes and binds it to
this hook; called without one (by another trainer) the hook builds its own.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.distributed as dist
from torch import nn

from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.models.llama3.infra.parallelize import (
    _op_sac_save_list,
    apply_compile,
    apply_ddp,
    apply_fsdp,
    apply_tp,
)
from torchtitan.tools.logging import logger
from torchtitan.tools.utils import device_type

from ..memory import HostMemory, HostOffloader
from ..memory.host import Allocate
from .checks import validate_job_config
from .cpu_compat import use_sum_reductions
from .groups import CPGroups, build_cp_groups
from .memory_stack import apply_offloaded_checkpointing, apply_tiling, describe
from .shape import JobShape
from .sharding import SequenceSharder
from .styles import CPStyle, get_style

# selective AC saves the whole staged UPipe attention as one op (never re-runs its stages)
UPIPE_SAC_SAVE_LIST = _op_sac_save_list | {torch.ops.upipe.attention_forward.default,
                                             torch.ops.upipe.projected_attention_forward.default}


@dataclass(frozen=True)
class CPPlan:
    """One job's context parallelism at run time, built once per trainer.

    ``groups`` and ``sharder`` are this rank's (:class:`~.groups.CPGroups`, the style's
    :class:`~.sharding.SequenceSharder`, ``None`` for TorchTitan's own); ``cp_mesh`` is
    TorchTitan's CP mesh (``None`` without CP); ``offloader`` holds the offloaded block
    inputs (``memory.offload_activations``); ``host_memory`` makes every host buffer of the
    job (the offloaded inputs', the optimizer state's: ``memory.offload_pinned`` page-locks
    them on CUDA).  ``inline_upipe`` runs UPipe without its custom-op boundary, and
    ``host_allocate`` (:data:`~torchtitan_upipe.memory.host.Allocate`) makes the host buffers,
    for the CPU memory estimator.
    """

    shape: JobShape
    style: CPStyle
    groups: CPGroups
    sharder: SequenceSharder | None
    cp_mesh: object | None
    kernel: str
    device: torch.device
    host_memory: HostMemory
    offloader: HostOffloader | None = None
    inline_upipe: bool = False
    fuse_wo: bool = False
    """``memory.fuse_output_projection``: UPipe's op applies ``wo``."""

    @classmethod
    def build(cls, job_config, parallel_dims: ParallelDims, *, inline_upipe: bool = False,
              host_allocate: Allocate | None = None) -> CPPlan:
        """Collective when CP is on (it creates the all-to-all and ring groups)."""
        shape = JobShape.from_job_config(job_config, parallel_dims.world_size)
        style = get_style(job_config.context_parallel.style if parallel_dims.cp_enabled else "none")
        cp_mesh = parallel_dims.get_mesh("cp") if parallel_dims.cp_enabled else None
        groups = (build_cp_groups(cp_mesh, shape.ulysses) if style.uses_all_to_all
                  else CPGroups.local())
        device = torch.device(device_type)
        mem = job_config.memory
        host_memory = HostMemory(pinned=mem.offload_pinned and device.type == "cuda",
                                 allocate=host_allocate)
        offloader = (HostOffloader(device, host_memory=host_memory)
                     if mem.offload_activations else None)
        return cls(shape, style, groups, style.sharder(groups), cp_mesh,
                   job_config.context_parallel.kernel, device, host_memory, offloader,
                   inline_upipe, mem.fuse_output_projection)


def parallelize_llama_cp(model: nn.Module, parallel_dims: ParallelDims, job_config,
                         plan: CPPlan | None = None) -> nn.Module:
    """Apply TP, context parallelism, activation checkpointing, compile and FSDP, in that order."""
    validate_job_config(job_config, world_size=parallel_dims.world_size)
    if plan is None:
        plan = CPPlan.build(job_config, parallel_dims)

    if parallel_dims.tp_enabled:  # style 'none' only (validated)
        apply_tp(
            model,
            parallel_dims.get_mesh("tp"),
            loss_parallel=not job_config.parallelism.disable_loss_parallel,
            enable_float8_tensorwise_tp=False,
            cp_enabled=False,
        )

    if parallel_dims.cp_enabled:
        plan.style.install(model, plan, job_config)

    mem = job_config.memory
    apply_tiling(model, mem, local_seq_len=plan.shape.local_seq)

    model_compile_enabled = job_config.compile.enable and "model" in job_config.compile.components
    shape = plan.shape
    for line in describe(mem, shape.local_seq, shape.batch, shape.model.dim, len(model.layers)):
        logger.info(line)
    if plan.offloader is not None:  # validated: activation_checkpoint.mode == "full", no compile
        apply_offloaded_checkpointing(model, mem, plan.offloader)
    elif job_config.activation_checkpoint.mode != "none":
        apply_ac(
            model,
            job_config.activation_checkpoint,
            model_compile_enabled=model_compile_enabled,
            op_sac_save_list=UPIPE_SAC_SAVE_LIST,
            base_folder=job_config.job.dump_folder,
        )

    if model_compile_enabled:
        apply_compile(model, job_config.compile)

    if parallel_dims.fsdp_enabled:
        names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
        apply_fsdp(
            model,
            parallel_dims.get_mesh(names),
            param_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[job_config.training.mixed_precision_reduce],
            pp_enabled=parallel_dims.pp_enabled,
            cpu_offload=job_config.training.enable_cpu_offload,
            reshard_after_forward_policy=job_config.parallelism.fsdp_reshard_after_forward,
        )
        if dist.is_initialized() and dist.get_backend() == "gloo":
            use_sum_reductions(model)
        logger.info("Applied FSDP to the model")
    elif parallel_dims.dp_replicate_enabled:
        apply_ddp(model, parallel_dims.get_mesh("dp_replicate"), enable_compile=model_compile_enabled)

    return model
