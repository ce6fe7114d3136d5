"""Config-time checks: every bad option fails before the trainer touches a device.

:func:`validate_job_config` is called by :class:`~.trainer.UPipeTrainer` before TorchTitan
initializes distributed, builds the model or allocates anything.  Each error names the
offending option and the valid choices.  It runs the checks every job gets (degrees, the
``[memory]`` and ``[benchmark]`` sections), then the configured style's own
(:meth:`~.styles.CPStyle.check`) on the job's :class:`~.shape.JobShape`.
"""

from __future__ import annotations

import os

import torch

from .config import ConfigError
from .shape import JobShape
from .styles import get_style, style_names


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


def validate_job_config(job_config, world_size: int | None = None, cuda: bool | None = None,
                        *, args=None) -> JobShape:
    """Raise :class:`ConfigError` for any invalid context-parallel configuration; return the
    job's :class:`~.shape.JobShape`.  ``args``: the model args (default: :func:`model_args`)."""
    cp = job_config.context_parallel
    par = job_config.parallelism
    world = world_size_from_env(job_config) if world_size is None else world_size
    cuda = torch.cuda.is_available() if cuda is None else cuda
    degree = par.context_parallel_degree
    try:  # also checked by the dataclass; kept for configs built by hand
        style = get_style(cp.style)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if degree < 1 or world % degree != 0:
        raise ConfigError(
            f"parallelism.context_parallel_degree={degree} does not divide the world size {world}; "
            f"valid: {[d for d in range(1, world + 1) if world % d == 0]}"
        )
    _validate_degrees_and_batch(job_config, world)
    _validate_memory(job_config)
    _validate_benchmark(job_config, world)
    _validate_checkpoint(job_config)
    if cp.style != "none":
        if degree == 1:
            raise ConfigError(
                f"context_parallel.style={cp.style!r} needs parallelism.context_parallel_degree > 1 "
                f"(got 1); use style='none' to train without context parallelism"
            )
        if par.tensor_parallel_degree > 1 or par.pipeline_parallel_degree > 1:
            raise ConfigError(
                f"context_parallel.style={cp.style!r} is supported with FSDP/HSDP only: set "
                f"parallelism.tensor_parallel_degree and pipeline_parallel_degree to 1"
            )
    args = model_args(job_config) if args is None else args
    if cp.upipe_chunk_heads == "auto":
        _resolve_auto_chunk_heads(job_config, style, world, args, cuda)
    shape = JobShape.from_job_config(job_config, world, args)
    style.check(job_config, shape, args, cuda)
    _validate_memory_shape(job_config, shape)
    return shape


def _resolve_auto_chunk_heads(job_config, style, world: int, args, cuda: bool) -> None:
    """``upipe_chunk_heads = "auto"``: the layout must pass the style's checks with the
    default ``U``; then the largest ``U`` that passes them and fits is written into the config
    (:func:`~.fitting.resolve_auto_chunk_heads`), and the log says why."""
    from torchtitan.tools.logging import logger

    from .fitting import resolve_auto_chunk_heads

    def check(chunk_heads: int) -> None:
        shape = JobShape.from_job_config(job_config, world, args, chunk_heads)
        style.check(job_config, shape, args, cuda)

    def allowed(chunk_heads: int) -> bool:
        try:
            check(chunk_heads)
        except ConfigError:
            return False
        return True

    if job_config.context_parallel.style == "upipe":
        check(0)  # the layout's own errors first, worded for the options the user set
    choice = resolve_auto_chunk_heads(job_config, world, args, cuda, allowed)
    logger.info(f"context_parallel.upipe_chunk_heads='auto' -> {choice.reason()}")


def _validate_degrees_and_batch(job_config, world: int) -> None:
    """TorchTitan's own assertions on the degrees and batch sizes, as errors that name the
    options (TorchTitan would raise an AssertionError from deep in the trainer)."""
    par, tr = job_config.parallelism, job_config.training
    named = {"parallelism.data_parallel_replicate_degree": par.data_parallel_replicate_degree,
             "parallelism.context_parallel_degree": par.context_parallel_degree,
             "parallelism.tensor_parallel_degree": par.tensor_parallel_degree,
             "parallelism.pipeline_parallel_degree": par.pipeline_parallel_degree}
    for name, value in named.items():
        if value < 1:
            raise ConfigError(f"{name}={value} must be >= 1")
    others = 1
    for value in named.values():
        others *= value
    shard = par.data_parallel_shard_degree
    if shard == -1:
        shard = world // others if world % others == 0 else 0
    if shard < 1 or others * shard != world:
        raise ConfigError(
            f"the degrees do not multiply to the world size {world}: "
            + " x ".join(f"{k.split('.')[1]}={v}" for k, v in named.items())
            + f" x data_parallel_shard_degree={par.data_parallel_shard_degree}; set "
            f"parallelism.data_parallel_shard_degree = -1 to use the remaining ranks")
    for name in ("local_batch_size", "seq_len", "steps"):
        if getattr(tr, name) < 1:
            raise ConfigError(f"training.{name}={getattr(tr, name)} must be >= 1")
    per_step = tr.local_batch_size * par.data_parallel_replicate_degree * shard
    if tr.global_batch_size != -1 and (tr.global_batch_size < per_step
                                       or tr.global_batch_size % per_step):
        raise ConfigError(
            f"training.global_batch_size={tr.global_batch_size} must be -1 (one micro-batch) or a "
            f"multiple of training.local_batch_size x the data-parallel degree = "
            f"{tr.local_batch_size} x {per_step // tr.local_batch_size} = {per_step} (the "
            f"gradient accumulation steps are the quotient)")


OPTIMIZERS_WITH_STATE = ("Adam", "AdamW")
"""TorchTitan 0.2.2's optimizers (``build_optimizers``); both keep two tensors per parameter."""


def _validate_optimizer_offload(opt) -> None:
    if opt.name not in OPTIMIZERS_WITH_STATE:
        raise ConfigError(
            f"memory.offload_optimizer_state=true moves the optimizer's state to host memory, "
            f"which it supports for optimizer.name in {list(OPTIMIZERS_WITH_STATE)} (got "
            f"{opt.name!r}); set memory.offload_optimizer_state=false")
    if getattr(opt, "early_step_in_backward", False):
        raise ConfigError(
            "memory.offload_optimizer_state=true keeps the optimizer's state in host memory "
            "during the backward, but optimizer.early_step_in_backward=true steps inside the "
            "backward; set one of them to false")


def _validate_memory(job_config) -> None:
    mem = getattr(job_config, "memory", None)
    if mem is None:
        return
    if not mem.offload_pinned and not (mem.offload_activations or mem.offload_optimizer_state):
        raise ConfigError(
            "memory.offload_pinned=false chooses pageable host buffers for offloaded "
            "activations or optimizer state, but memory.offload_activations=false and "
            "memory.offload_optimizer_state=false offload nothing; set one of them to true or "
            "leave memory.offload_pinned at true"
        )
    if mem.offload_optimizer_state:
        _validate_optimizer_offload(job_config.optimizer)
    if mem.offload_activations:
        mode = job_config.activation_checkpoint.mode
        if mode != "full":
            raise ConfigError(
                f"memory.offload_activations=true offloads the inputs of fully checkpointed blocks; "
                f"set activation_checkpoint.mode='full' (got {mode!r})"
            )
        if job_config.compile.enable:
            raise ConfigError("memory.offload_activations=true does not work with compile.enable=true yet")
    if mem.offload_refetch_input and not mem.offload_activations:
        raise ConfigError(
            "memory.offload_refetch_input=true copies an offloaded block input back from host "
            "memory for the attention norm's backward, but memory.offload_activations=false "
            "offloads none; set memory.offload_activations=true or "
            "memory.offload_refetch_input=false")
    if mem.offload_inplace_residual_grads and not mem.offload_activations:
        raise ConfigError(
            "memory.offload_inplace_residual_grads=true sums the residual gradients in place in "
            "the recompute of the plugin's offloaded checkpointing, but "
            "memory.offload_activations=false; set memory.offload_activations=true or "
            "memory.offload_inplace_residual_grads=false")
    if mem.fuse_output_projection:
        style = job_config.context_parallel.style
        degree = job_config.parallelism.context_parallel_degree
        if not (get_style(style).stages_heads and degree > 1):
            raise ConfigError(
                f"memory.fuse_output_projection=true applies wo inside UPipe's op: it needs "
                f"context_parallel.style='upipe' with context_parallel_degree > 1 (got "
                f"style={style!r}, degree {degree}); or memory.fuse_output_projection=false")
    if mem.offload_stride > 1:
        if not mem.offload_activations:
            raise ConfigError(
                f"memory.offload_stride={mem.offload_stride} keeps every k-th offloaded block "
                f"input on the host, but memory.offload_activations=false offloads none; set "
                f"memory.offload_activations=true or memory.offload_stride=1")
        if mem.keep_attention_output != "none":
            raise ConfigError(
                f"memory.offload_stride={mem.offload_stride} regenerates block inputs with plain "
                f"forwards and does not take memory.keep_attention_output="
                f"{mem.keep_attention_output!r}; set keep_attention_output='none' or "
                f"offload_stride=1")
    keep = mem.keep_attention_output
    if keep != "none":
        if not mem.offload_activations:
            raise ConfigError(
                f"memory.keep_attention_output={keep!r} replays the attention result in the "
                f"recompute of the plugin's offloaded checkpointing; set "
                f"memory.offload_activations=true (with memory.offload_keep_layers = the number "
                f"of layers, nothing is offloaded), or keep_attention_output='none'")
        style = get_style(job_config.context_parallel.style)
        cp_on = job_config.parallelism.context_parallel_degree > 1
        if not (style.uses_all_to_all and cp_on):
            family = [n for n in style_names() if get_style(n).uses_all_to_all]
            raise ConfigError(
                f"memory.keep_attention_output={keep!r} needs the plugin's attention: "
                f"context_parallel.style one of {family} with context_parallel_degree > 1 (got "
                f"style={job_config.context_parallel.style!r}, degree "
                f"{job_config.parallelism.context_parallel_degree}); or keep_attention_output='none'")
    if job_config.parallelism.pipeline_parallel_degree > 1:
        raise ConfigError(
            "the upipe_llama3 train spec does not support pipeline parallelism: set "
            "parallelism.pipeline_parallel_degree = 1"
        )
    if mem.chunked_loss and job_config.parallelism.tensor_parallel_degree > 1:
        raise ConfigError("memory.chunked_loss=true does not support tensor parallelism (loss parallel)")
    _validate_linear_converters(job_config)


def _validate_linear_converters(job_config) -> None:
    """TorchTitan's quantized-Linear converters (float8, MX) swap ``nn.Linear`` modules, but
    UPipe's fused op, the tiled MLP and the chunked loss compute with the weights directly and
    would skip the swapped modules without a word."""
    converters = [c for c in job_config.model.converters if c.startswith("quantize.linear.")]
    if not converters:
        return
    mem = job_config.memory
    bypass = [who for who, on in (
        ("context_parallel.style='upipe' (wq, wk, wv inside its fused op)",
         job_config.context_parallel.style == "upipe"),
        ("memory.tiled_mlp=true (w1, w2, w3)", mem.tiled_mlp),
        ("memory.chunked_loss=true (output)", mem.chunked_loss)) if on]
    if bypass:
        raise ConfigError(
            f"model.converters={converters} swap nn.Linear layers for quantized ones, but "
            f"{' and '.join(bypass)} compute with the weights directly and would skip them; "
            f"remove the converter, or use style 'ulysses'/'usp' without those [memory] options")


def _validate_memory_shape(job_config, shape: JobShape) -> None:
    """``[memory]`` values the job's shape cannot honour are errors, not clamps: more tiles or
    loss chunks than the tokens each rank holds per sample, more kept layers than layers."""
    mem = getattr(job_config, "memory", None)
    if mem is None:
        return
    tokens = shape.local_seq
    for on, name in (("tiled_mlp", "mlp_tiles"), ("tiled_norm", "norm_tiles"),
                     ("chunked_loss", "loss_chunks")):
        value = getattr(mem, name)
        if getattr(mem, on) and value > tokens:
            raise ConfigError(
                f"memory.{name}={value} splits the sequence into more pieces than the {tokens} "
                f"tokens each rank holds (training.seq_len / parallelism.context_parallel_degree); "
                f"valid: 0 (automatic) or 1 to {tokens}"
            )
    layers = shape.model.n_layers
    offloaded = layers - min(mem.offload_keep_layers, layers)
    if mem.offload_activations and mem.offload_stride > 1 and offloaded % mem.offload_stride:
        valid = [k for k in range(1, offloaded + 1) if offloaded % k == 0]
        raise ConfigError(
            f"memory.offload_stride={mem.offload_stride} must divide the {offloaded} offloaded "
            f"layers ({layers} layers, offload_keep_layers={mem.offload_keep_layers}) into "
            f"segments; valid: {valid}")
    if mem.offload_activations and mem.offload_keep_layers > layers:
        raise ConfigError(
            f"memory.offload_keep_layers={mem.offload_keep_layers} keeps more layers on the device "
            f"than the model has ({layers}); valid: 0 to {layers} ({layers} offloads nothing)"
        )


def _validate_checkpoint(job_config) -> None:
    from .resume import ON_SCHEDULE_CHANGE

    ckpt = job_config.checkpoint
    choice = getattr(ckpt, "on_schedule_change", "error")
    if choice not in ON_SCHEDULE_CHANGE:
        raise ConfigError(f"checkpoint.on_schedule_change={choice!r} is not one of "
                          f"{list(ON_SCHEDULE_CHANGE)}")
    if (ckpt.enable and ckpt.last_save_model_only and not ckpt.create_seed_checkpoint
            and not getattr(ckpt, "_model_only_warned", False)):  # the checks run twice per job
        from torchtitan.tools.logging import logger

        ckpt._model_only_warned = True
        logger.warning(
            "checkpoint.last_save_model_only=true: the checkpoint saved at the last step will "
            "hold the model weights only, so this run cannot be resumed or extended from it; "
            "--checkpoint.no_last_save_model_only saves everything (the plugin's configs do)")


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


__all__ = ["ConfigError", "model_args", "style_names", "validate_job_config",
           "world_size_from_env"]
