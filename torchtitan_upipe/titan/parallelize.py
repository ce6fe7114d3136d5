"""The parallelize hook: TorchTitan's order (TP, CP, memory stack, AC, compile, FSDP).

:func:`parallelize_llama_cp` reads like TorchTitan's ``parallelize_llama`` and reuses its
pieces.  It differs in three places: :func:`apply_context_parallel` installs the configured
style in every attention layer with the CP process group passed explicitly; the
``[memory]`` tiling and chunked loss are applied to the modules in place; and with
``memory.offload_activations`` the block-level checkpointing is the host-offloading one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from torchtitan.distributed import ParallelDims
from torchtitan.distributed.activation_checkpoint import apply_ac
from torchtitan.distributed.context_parallel import apply_cp_to_attention_module
from torchtitan.models.llama3.infra.parallelize import (
    _op_sac_save_list,
    apply_compile,
    apply_ddp,
    apply_fsdp,
    apply_tp,
)
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.tools.logging import logger
from torchtitan.tools.utils import device_type

from .cpu_compat import use_sum_reductions
from ..cp.kernels import get_kernel
from ..memory import apply_offloaded_ac
from .memory_stack import apply_tiling
from .groups import cp_groups
from .metrics import AttentionTimer
from .attention import (
    ContextParallelAttention,
    UlyssesStrategy,
    UPipeStrategy,
    check_sharding_once,
)
from .sharding import sharder_for
from .checks import resolved_chunk_heads, validate_job_config

# selective AC saves the whole staged UPipe attention as one op (never re-runs its stages)
UPIPE_SAC_SAVE_LIST = _op_sac_save_list | {torch.ops.upipe.attention_forward.default}


def apply_context_parallel(model: nn.Module, parallel_dims: ParallelDims, job_config) -> None:
    """Install ``job_config.context_parallel.style`` on every attention layer of ``model``."""
    cp = job_config.context_parallel
    cp_mesh = parallel_dims.get_mesh("cp")
    if cp.style == "ring":
        from torch.distributed.tensor.experimental._attention import set_rotate_method

        # TorchTitan 0.2.2 applies the rotate method only in validation; apply it for training too
        set_rotate_method(job_config.parallelism.context_parallel_rotate_method)
        apply_cp_to_attention_module(
            [block.attention.inner_attention for block in model.layers.values()], cp_mesh, "sdpa"
        )
        return

    groups = cp_groups(parallel_dims, cp.ulysses_degree)
    sharder = sharder_for(groups)
    device = torch.device(device_type)
    for block in model.layers.values():
        if cp.style in ("ulysses", "usp"):
            strategy = UlyssesStrategy(groups, get_kernel(cp.kernel, device))
        elif cp.style == "upipe":
            strategy = UPipeStrategy(groups, cp.kernel, resolved_chunk_heads(cp, groups.ulysses_degree))
        else:  # validate_job_config rejects the rest before we get here
            raise AssertionError(cp.style)
        timer = AttentionTimer() if cp.time_attention else None
        block.attention = ContextParallelAttention(block.attention, strategy, timer)
    check_sharding_once(model, sharder)
    if hasattr(model, "use_local_rope"):  # keep only this rank's RoPE rows (exact, less memory)
        model.use_local_rope(sharder.indices(job_config.training.seq_len))
    logger.info(
        f"Applied context_parallel.style={cp.style!r} (degree {cp_mesh.size()} = all-to-all "
        f"{groups.ulysses_degree} x ring {groups.ring_degree}, kernel {cp.kernel!r}) "
        f"to {len(model.layers)} attention layers"
    )


def parallelize_llama_cp(model: nn.Module, parallel_dims: ParallelDims, job_config) -> nn.Module:
    """Apply TP, context parallelism, activation checkpointing, compile and FSDP, in that order."""
    validate_job_config(job_config, world_size=parallel_dims.world_size)

    if parallel_dims.tp_enabled:  # style 'none' only (validated)
        apply_tp(
            model,
            parallel_dims.get_mesh("tp"),
            loss_parallel=not job_config.parallelism.disable_loss_parallel,
            enable_float8_tensorwise_tp=False,
            cp_enabled=False,
        )

    if parallel_dims.cp_enabled:
        apply_context_parallel(model, parallel_dims, job_config)

    mem = job_config.memory
    apply_tiling(model, mem, local_seq_len=job_config.training.seq_len // parallel_dims.cp)

    model_compile_enabled = job_config.compile.enable and "model" in job_config.compile.components
    if mem.offload_activations:  # validated: activation_checkpoint.mode == "full", no compile
        apply_offloaded_ac(model, mem.offload_keep_layers, torch.device(device_type), mem.offload_prefetch)
        logger.info(
            f"Applied full activation checkpointing with block inputs offloaded to host memory "
            f"(first {mem.offload_keep_layers} layers kept on the device)"
        )
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
