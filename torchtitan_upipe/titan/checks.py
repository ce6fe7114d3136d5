"""Config-time checks: every bad option fails before the trainer touches a device.

:func:`validate_job_config` is called by :class:`~torchtitan_upipe.trainer.UPipeTrainer` before
TorchTitan initializes distributed, builds the model or allocates anything.  Each error names
the offending option and the valid choices.
"""

from __future__ import annotations

import os

import torch

from .config import STYLES, ULYSSES_FAMILY, ContextParallel
from ..cp.gqa import kv_replication
from ..cp.kernels import get_kernel
from ..cp.upipe.schedule import UPipeSchedule, valid_chunk_heads

# styles whose implementation has not landed yet
_NOT_YET: dict[str, str] = {}


class ConfigError(ValueError):
    """An invalid combination of options, raised before training starts."""


def world_size_from_env(job_config) -> int:
    """World size the job will run with: NGPU for TorchTitan's fake backend (one real rank
    simulating an NGPU-rank job), else torchrun's WORLD_SIZE."""
    if job_config.comm.mode in ("fake_backend", "local_tensor"):
        return int(os.environ.get("NGPU", "1"))
    return int(os.environ.get("WORLD_SIZE", "1"))


def model_args(job_config):
    """The TorchTitan model args of the configured ``model.name`` / ``model.flavor``."""
    from torchtitan.protocols.train_spec import get_train_spec

    spec = get_train_spec(job_config.model.name)
    if job_config.model.flavor not in spec.model_args:
        raise ConfigError(
            f"model.flavor={job_config.model.flavor!r} is not a flavor of model.name="
            f"{job_config.model.name!r}; valid: {sorted(spec.model_args)}"
        )
    return spec.model_args[job_config.model.flavor]


def resolved_chunk_heads(cp: ContextParallel, degree: int) -> int:
    return cp.upipe_chunk_heads or degree


def validate_job_config(job_config, world_size: int | None = None, cuda: bool | None = None) -> None:
    """Raise :class:`ConfigError` for any invalid context-parallel configuration."""
    cp: ContextParallel = job_config.context_parallel
    par = job_config.parallelism
    world = world_size_from_env(job_config) if world_size is None else world_size
    cuda = torch.cuda.is_available() if cuda is None else cuda
    degree = par.context_parallel_degree
    style = cp.style

    if style not in STYLES:  # also checked by the dataclass; kept for configs built by hand
        raise ConfigError(f"context_parallel.style={style!r} is not one of {list(STYLES)}")
    if style in _NOT_YET:
        raise ConfigError(
            f"context_parallel.style={style!r} ({_NOT_YET[style]}) is not implemented yet; "
            f"valid now: {[s for s in STYLES if s not in _NOT_YET]}"
        )
    if degree < 1 or world % degree != 0:
        raise ConfigError(
            f"parallelism.context_parallel_degree={degree} does not divide the world size {world}; "
            f"valid: {[d for d in range(1, world + 1) if world % d == 0]}"
        )
    _validate_memory(job_config)
    _validate_benchmark(job_config, world)
    if style == "none":
        if degree > 1:
            raise ConfigError(
                f"parallelism.context_parallel_degree={degree} but context_parallel.style='none'; "
                f"choose a style from {[s for s in STYLES if s != 'none']} or set the degree to 1"
            )
        return
    if degree == 1:
        raise ConfigError(
            f"context_parallel.style={style!r} needs parallelism.context_parallel_degree > 1 "
            f"(got 1); use style='none' to train without context parallelism"
        )
    if par.tensor_parallel_degree > 1 or par.pipeline_parallel_degree > 1:
        raise ConfigError(
            f"context_parallel.style={style!r} is supported with FSDP/HSDP only: set "
            f"parallelism.tensor_parallel_degree and pipeline_parallel_degree to 1"
        )

    seq_len = job_config.training.seq_len
    if style == "ring":
        if not cuda:
            raise ConfigError(
                "context_parallel.style='ring' selects TorchTitan's built-in ring attention (torch "
                "SDPA ring), which needs CUDA; this machine has no CUDA device. Valid on CPU: "
                f"{[s for s in STYLES if s != 'ring']}"
            )
        if cp.kernel not in ("auto", "sdpa"):
            raise ConfigError(
                f"context_parallel.kernel={cp.kernel!r} has no effect with style='ring' (torch's "
                f"SDPA dispatcher picks the kernel); use kernel='auto'"
            )
        if seq_len % (2 * degree) != 0:
            raise ConfigError(
                f"training.seq_len={seq_len} must be divisible by 2 * context_parallel_degree = "
                f"{2 * degree} for style='ring' (head-tail load balancing)"
            )
        return

    assert style in ULYSSES_FAMILY
    if job_config.validation.enable:
        raise ConfigError(
            f"validation.enable=true is not supported with context_parallel.style={style!r} yet "
            f"(TorchTitan's validator shards for its own ring attention); set validation.enable=false"
        )
    u = cp.ulysses_degree or degree
    if degree % u != 0:
        raise ConfigError(
            f"context_parallel.ulysses_degree={u} does not divide parallelism.context_parallel_degree="
            f"{degree}; valid: {[d for d in range(1, degree + 1) if degree % d == 0]}"
        )
    ring = degree // u
    if style == "ulysses" and ring > 1:
        raise ConfigError(
            f"context_parallel.style='ulysses' uses all {degree} CP ranks for the all-to-all, but "
            f"context_parallel.ulysses_degree={u}; for a Ulysses x ring hybrid use style='usp' "
            f"(or 'upipe'), else set ulysses_degree to 0"
        )
    if style == "usp" and ring == 1:
        raise ConfigError(
            f"context_parallel.style='usp' with ulysses_degree={u} = context_parallel_degree leaves a "
            f"ring of one rank; set context_parallel.ulysses_degree to one of "
            f"{[d for d in range(1, degree) if degree % d == 0]} or use style='ulysses'"
        )
    if ring > 1 and seq_len % (2 * degree) != 0:
        raise ConfigError(
            f"training.seq_len={seq_len} must be divisible by 2 * context_parallel_degree = "
            f"{2 * degree} for the ring dimension (zigzag load balancing over {ring} ring ranks)"
        )
    if seq_len % degree != 0:
        raise ConfigError(
            f"training.seq_len={seq_len} is not divisible by parallelism.context_parallel_degree="
            f"{degree}; every rank must hold the same number of tokens"
        )
    args = model_args(job_config)
    n_heads, n_kv = args.n_heads, args.n_kv_heads or args.n_heads
    if getattr(args, "attn_type", "sdpa") != "sdpa":
        raise ConfigError(
            f"model.flavor={job_config.model.flavor!r} uses attn_type={args.attn_type!r}; "
            f"context_parallel.style={style!r} computes causal attention itself and needs a flavor "
            f"with attn_type='sdpa' (no flex/varlen document masks)"
        )
    try:
        kv_replication(n_heads, n_kv, u)
    except ValueError as e:
        raise ConfigError(
            f"model {job_config.model.name}/{job_config.model.flavor} cannot use an all-to-all "
            f"over {u} ranks (parallelism.context_parallel_degree={degree}, "
            f"context_parallel.ulysses_degree={cp.ulysses_degree}): {e}"
        ) from None
    if style == "upipe":
        try:
            UPipeSchedule(n_heads, n_kv, u, resolved_chunk_heads(cp, u))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    elif cp.upipe_chunk_heads:
        raise ConfigError(
            f"context_parallel.upipe_chunk_heads={cp.upipe_chunk_heads} is only used by style='upipe' "
            f"(got style={style!r}); leave it at 0"
        )
    try:
        kernel = get_kernel(cp.kernel, "cuda" if cuda else "cpu")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if job_config.compile.enable and cp.time_attention:
        raise ConfigError(
            "compile.enable=true with context_parallel.time_attention=true: the attention timer "
            "breaks fullgraph compilation; set context_parallel.time_attention=false"
        )
    param_dtype = job_config.training.mixed_precision_param
    if cuda and kernel.name != "math" and param_dtype not in ("bfloat16", "float16"):
        raise ConfigError(
            f"context_parallel.kernel={cp.kernel!r} resolves to {kernel.name!r}, a flash kernel that "
            f"takes bfloat16/float16 on CUDA, but training.mixed_precision_param={param_dtype!r}; "
            f"use bfloat16, or kernel='math' for exact float32 attention"
        )


def _validate_memory(job_config) -> None:
    mem = getattr(job_config, "memory", None)
    if mem is None:
        return
    if mem.offload_activations:
        mode = job_config.activation_checkpoint.mode
        if mode != "full":
            raise ConfigError(
                f"memory.offload_activations=true offloads the inputs of fully checkpointed blocks; "
                f"set activation_checkpoint.mode='full' (got {mode!r})"
            )
        if job_config.compile.enable:
            raise ConfigError("memory.offload_activations=true does not work with compile.enable=true yet")
    if job_config.parallelism.pipeline_parallel_degree > 1:
        raise ConfigError(
            "the upipe_llama3 train spec does not support pipeline parallelism: set "
            "parallelism.pipeline_parallel_degree = 1"
        )
    if mem.chunked_loss and job_config.parallelism.tensor_parallel_degree > 1:
        raise ConfigError("memory.chunked_loss=true does not support tensor parallelism (loss parallel)")


def _validate_benchmark(job_config, world: int) -> None:
    bench = getattr(job_config, "benchmark", None)
    if bench is None or bench.fake_rank == 0:
        return
    if job_config.comm.mode != "fake_backend":
        raise ConfigError(
            f"benchmark.fake_rank={bench.fake_rank} simulates one rank of a job and needs "
            f"comm.mode='fake_backend' (got {job_config.comm.mode!r}); leave it at 0 otherwise"
        )
    if bench.fake_rank >= world:
        raise ConfigError(
            f"benchmark.fake_rank={bench.fake_rank} is not a rank of the {world}-rank job "
            f"(NGPU={world}); valid: 0 to {world - 1}"
        )


__all__ = ["ConfigError", "validate_job_config", "valid_chunk_heads"]
