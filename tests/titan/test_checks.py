"""Config validation: every bad option fails at config time with a message naming it."""

import os

import pytest

import torchtitan_upipe.train_spec  # noqa: F401  (registers upipe_llama3)
from tests.helpers.paths import CONFIGS
from torchtitan.config import ConfigManager
from torchtitan_upipe.titan.checks import ConfigError, validate_job_config


def _config(*args, config="llama3_debug_upipe.toml"):
    return ConfigManager().parse_args(["--job.config_file", os.path.join(CONFIGS, config), *args])


def _fails(match, *args, world=2, cuda=False, config="llama3_debug_upipe.toml", model_args=None):
    with pytest.raises(ConfigError, match=match):
        validate_job_config(_config(*args, config=config), world_size=world, cuda=cuda,
                            args=model_args)


def test_shipped_debug_configs_validate():
    validate_job_config(_config(), world_size=2, cuda=False)
    validate_job_config(_config(config="llama3_debug_ulysses.toml"), world_size=2, cuda=False)
    validate_job_config(_config(config="llama3_debug_none.toml"), world_size=1, cuda=False)


def test_seq_len_not_divisible_by_degree():
    _fails(r"training.seq_len=511 is not divisible by parallelism.context_parallel_degree=2", "--training.seq_len=511")


def test_heads_not_divisible_by_degree():
    # debugmodel has 16 heads: 3 ranks cannot split them
    _fails(r"context_parallel_degree=3.*n_heads=16 is not divisible", "--parallelism.context_parallel_degree=3",
           "--training.seq_len=510", world=3)


def test_kv_heads_incompatible_with_degree():
    # Llama3-8B: 32 heads, 8 KV heads; degree 16 replicates (ok), 32 heads / degree 32 ok; use 3B-like mismatch
    from torchtitan_upipe.titan.llama3 import LlamaArgs

    args = LlamaArgs(dim=96, n_layers=2, n_heads=24, n_kv_heads=6)
    _fails(r"n_kv_heads=6 and the all-to-all degree 4 are incompatible",
           "--parallelism.context_parallel_degree=4", world=4, model_args=args)


def test_upipe_chunk_heads_rules():
    _fails(r"upipe_chunk_heads=3 must be a positive multiple of the all-to-all degree 2.*valid: \[2, 4, 8, 16\]",
           "--context_parallel.upipe_chunk_heads=3")
    _fails(r"upipe_chunk_heads=6 must divide n_heads=16", "--context_parallel.upipe_chunk_heads=6")
    _fails(r"upipe_chunk_heads=4 is only used by style='upipe'", "--context_parallel.upipe_chunk_heads=4",
           config="llama3_debug_ulysses.toml")


def test_ring_needs_cuda():
    _fails(r"style='ring'.*needs CUDA.*Valid on CPU: \['none', 'ulysses', 'upipe', 'usp'\]",
           "--context_parallel.style=ring")
    validate_job_config(_config("--context_parallel.style=ring"), world_size=2, cuda=True)
    _fails(r"kernel='math' has no effect with style='ring'", "--context_parallel.style=ring",
           "--context_parallel.kernel=math", cuda=True)


def test_degree_must_divide_world():
    _fails(r"parallelism.context_parallel_degree=2 does not divide the world size 3; valid: \[1, 3\]", world=3)


def test_style_and_degree_must_agree():
    _fails(r"context_parallel.style='upipe' needs parallelism.context_parallel_degree > 1",
           "--parallelism.context_parallel_degree=1", world=1)
    _fails(r"context_parallel_degree=2 but context_parallel.style='none'", config="llama3_debug_none.toml",
           *["--parallelism.context_parallel_degree=2"])


def test_hybrid_degrees():
    # valid: usp 2 x 2, upipe 2 x 2, pure ring (u = 1) through usp
    for style in ("usp", "upipe"):
        validate_job_config(_config(f"--context_parallel.style={style}", "--parallelism.context_parallel_degree=4",
                                    "--context_parallel.ulysses_degree=2"), world_size=4, cuda=False)
    validate_job_config(_config("--context_parallel.style=usp", "--context_parallel.ulysses_degree=1"),
                        world_size=2, cuda=False)
    _fails(r"ulysses_degree=3 does not divide parallelism.context_parallel_degree=4; valid: \[1, 2, 4\]",
           "--context_parallel.style=usp", "--parallelism.context_parallel_degree=4",
           "--context_parallel.ulysses_degree=3", world=4)
    _fails(r"style='usp' with ulysses_degree=2 = context_parallel_degree leaves a ring of one rank",
           "--context_parallel.style=usp")
    _fails(r"style='ulysses' uses all 4 CP ranks.*use style='usp'", "--context_parallel.style=ulysses",
           "--parallelism.context_parallel_degree=4", "--context_parallel.ulysses_degree=2", world=4)
    # the ring needs zigzag chunks: seq_len % 2C
    _fails(r"training.seq_len=516 must be divisible by 2 \* context_parallel_degree = 8",
           "--context_parallel.style=usp", "--parallelism.context_parallel_degree=4",
           "--context_parallel.ulysses_degree=2", "--training.seq_len=516", world=4)
    # UPipe's U is counted over the all-to-all group
    _fails(r"upipe_chunk_heads=3 must be a positive multiple of the all-to-all degree 2",
           "--parallelism.context_parallel_degree=4", "--context_parallel.ulysses_degree=2",
           "--context_parallel.upipe_chunk_heads=3", world=4)


def test_float32_on_cuda_needs_the_math_kernel():
    # the debug configs train in float32: on CUDA the flash kernels would reject it at the first step
    _fails(r"kernel='auto' resolves to 'sdpa'.*mixed_precision_param='float32'", cuda=True)
    validate_job_config(_config("--context_parallel.kernel=math"), world_size=2, cuda=True)
    validate_job_config(_config("--training.mixed_precision_param=bfloat16"), world_size=2, cuda=True)


def test_unsupported_combinations():
    _fails(r"supported with FSDP/HSDP only", "--parallelism.tensor_parallel_degree=2", world=4)
    _fails(r"kernel='cudnn' cannot run on cpu", "--context_parallel.kernel=cudnn")
    _fails(r"validation.enable=true is not supported", "--validation.enable")
    _fails(r"model.flavor='9B' is not a flavor", "--model.flavor=9B")
    _fails(r"set context_parallel.time_attention=false", "--compile.enable")
    validate_job_config(_config("--compile.enable", "--context_parallel.no-time-attention"), world_size=2, cuda=False)


def test_fake_rank_needs_the_fake_backend_and_a_rank_of_the_job():
    # a causal ring's ranks differ in memory, so a one-rank measurement may simulate any rank
    _fails(r"benchmark.fake_rank=1 simulates one rank of a job and needs comm.mode='fake_backend'",
           "--benchmark.fake_rank=1")
    fake = ("--comm.mode=fake_backend", "--parallelism.context_parallel_degree=4")
    _fails(r"benchmark.fake_rank=4 is not a rank of the 4-rank job \(NGPU=4\); valid: 0 to 3",
           *fake, "--benchmark.fake_rank=4", world=4)
    validate_job_config(_config(*fake, "--benchmark.fake_rank=3"), world_size=4, cuda=False)


def test_flash_attention_2_offset_overflow_is_refused_with_what_avoids_it():
    """FA2's backward overflows 32-bit offsets at 2^31 (Ulysses, Llama3-8B over 8 at 4M):
    refused with the kernel and the UPipe U that avoid it; shorter, or UPipe U = 8, pass."""
    cfg = "llama3_8b_8xh100_ulysses.toml"
    _fails(r"FlashAttention-2.*4194304 query tokens x 4 heads of 128.*kernel='cudnn'.*"
           r"upipe_chunk_heads in \[8, 16\]", "--training.seq_len=4194304",
           "--context_parallel.kernel=sdpa", config=cfg, world=8, cuda=True)
    validate_job_config(_config("--training.seq_len=3145728", "--context_parallel.kernel=sdpa",
                                config=cfg), world_size=8, cuda=True)
    validate_job_config(_config("--training.seq_len=8388608", "--context_parallel.kernel=sdpa",
                                config="llama3_8b_8xh100_upipe.toml"), world_size=8, cuda=True)


def test_pageable_host_buffers_need_something_offloaded():
    _fails(r"memory.offload_pinned=false chooses pageable host buffers.*offload_activations=false "
           r"and memory.offload_optimizer_state=false offload nothing", "--memory.no-offload-pinned")
    validate_job_config(_config("--memory.no-offload-pinned", config="llama3_debug_upipe_memory.toml"),
                        world_size=2, cuda=False)
    validate_job_config(_config("--memory.no-offload-pinned", "--memory.offload_optimizer_state"),
                        world_size=2, cuda=False)


def test_refetching_the_input_needs_offloaded_activations():
    _fails(r"memory.offload_refetch_input=true copies an offloaded block input back from host "
           r"memory.*memory.offload_activations=false offloads none", "--memory.offload_refetch_input")
    validate_job_config(_config("--memory.offload_refetch_input",
                                config="llama3_debug_upipe_memory.toml"), world_size=2, cuda=False)


def test_inplace_residual_grads_need_offloaded_activations():
    _fails(r"memory.offload_inplace_residual_grads=true sums the residual gradients in place.*"
           r"memory.offload_activations=false; set memory.offload_activations=true or "
           r"memory.offload_inplace_residual_grads=false", "--memory.offload_inplace_residual_grads")
    validate_job_config(_config("--memory.offload_inplace_residual_grads",
                                config="llama3_debug_upipe_memory.toml"), world_size=2, cuda=False)


def test_offload_stride_needs_offloading_divides_the_offloaded_layers_and_keeps_no_results():
    _fails(r"memory.offload_stride=2 keeps every k-th offloaded block input on the host, but "
           r"memory.offload_activations=false offloads none", "--memory.offload_stride=2")
    stack = dict(config="llama3_debug_upipe_memory.toml")  # 6 layers, offload_keep_layers = 1
    _fails(r"memory.offload_stride=2 must divide the 5 offloaded layers \(6 layers, "
           r"offload_keep_layers=1\) into segments; valid: \[1, 5\]",
           "--memory.offload_stride=2", **stack)
    _fails(r"memory.offload_stride=3 regenerates block inputs with plain forwards and does "
           r"not take memory.keep_attention_output='host'", "--memory.offload_stride=3",
           "--memory.offload_keep_layers=0", "--memory.keep_attention_output=host", **stack)
    from torchtitan_upipe.titan.config import Memory

    with pytest.raises(ValueError, match=r"memory.offload_stride=0 must be an integer >= 1"):
        Memory(offload_stride=0)
    for args in (("--memory.offload_stride=5",),
                 ("--memory.offload_stride=3", "--memory.offload_keep_layers=0")):
        validate_job_config(_config(*args, **stack), world_size=2, cuda=False)


def test_fused_output_projection_needs_upipe():
    for args, got in ((("--context_parallel.style=ulysses",), "style='ulysses', degree 2"),
                      (("--parallelism.context_parallel_degree=1",), "style='upipe', degree 1")):
        _fails(r"memory.fuse_output_projection=true applies wo inside UPipe's op: it needs "
               r"context_parallel.style='upipe' with context_parallel_degree > 1 \(got "
               + got.replace("(", r"\(") + r"\); or memory.fuse_output_projection=false",
               "--memory.fuse_output_projection", *args)
    validate_job_config(_config("--memory.fuse_output_projection"), world_size=2, cuda=False)
    validate_job_config(_config("--memory.fuse_output_projection",
                                "--parallelism.context_parallel_degree=4",
                                "--context_parallel.ulysses_degree=2"), world_size=4, cuda=False)


def test_optimizer_state_offload_needs_a_stateful_optimizer_stepped_after_backward():
    validate_job_config(_config("--memory.offload_optimizer_state", "--optimizer.name=Adam"),
                        world_size=2, cuda=False)
    _fails(r"memory.offload_optimizer_state=true moves the optimizer's state to host memory, which "
           r"it supports for optimizer.name in \['Adam', 'AdamW'\] \(got 'SGD'\)",
           "--memory.offload_optimizer_state", "--optimizer.name=SGD")
    _fails(r"optimizer.early_step_in_backward=true steps inside the backward; set one of them to "
           r"false", "--memory.offload_optimizer_state", "--optimizer.early_step_in_backward")


@pytest.mark.parametrize("on, name", [("tiled_mlp", "mlp_tiles"), ("tiled_norm", "norm_tiles"),
                                      ("chunked_loss", "loss_chunks")])
def test_more_tiles_than_tokens_is_an_error_not_a_clamp(on, name):
    # seq_len 512 over C = 2: 256 tokens per rank and sample
    validate_job_config(_config(f"--memory.{on}", f"--memory.{name}=256"), world_size=2, cuda=False)
    _fails(rf"memory.{name}=257 splits the sequence into more pieces than the 256 tokens each "
           rf"rank holds.*valid: 0 \(automatic\) or 1 to 256", f"--memory.{on}", f"--memory.{name}=257")


def test_keeping_more_layers_than_the_model_has_is_an_error():
    full = ("--activation_checkpoint.mode=full", "--memory.offload_activations")
    validate_job_config(_config(*full, "--memory.offload_keep_layers=6"), world_size=2, cuda=False)
    _fails(r"memory.offload_keep_layers=7 keeps more layers on the device than the model has "
           r"\(6\); valid: 0 to 6", *full, "--memory.offload_keep_layers=7")
    # at the depth the job builds: benchmark.n_layers
    _fails(r"offload_keep_layers=3 .* \(2\); valid: 0 to 2", *full,
           "--memory.offload_keep_layers=3", "--benchmark.n_layers=2")


def test_on_schedule_change_choices():
    cfg = _config("--checkpoint.on_schedule_change=rebuild")
    assert cfg.checkpoint.on_schedule_change == "rebuild"
    validate_job_config(cfg, world_size=2, cuda=False)
    _fails(r"checkpoint.on_schedule_change='restart' is not one of \['error', 'rebuild'\]",
           "--checkpoint.on_schedule_change=restart")


def test_a_weights_only_last_save_is_announced(caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        validate_job_config(_config("--checkpoint.enable"), world_size=2, cuda=False)
    assert "last_save_model_only" not in caplog.text  # the shipped configs save everything
    with caplog.at_level(logging.WARNING):
        validate_job_config(_config("--checkpoint.enable", "--checkpoint.last_save_model_only"),
                            world_size=2, cuda=False)
    assert "cannot be resumed or extended from it" in caplog.text


def test_degrees_that_do_not_multiply_to_the_world_size():
    _fails(r"the degrees do not multiply to the world size 2: data_parallel_replicate_degree=1 x "
           r"context_parallel_degree=2 x .* x data_parallel_shard_degree=2; set "
           r"parallelism.data_parallel_shard_degree = -1", "--parallelism.data_parallel_shard_degree=2")
    _fails(r"parallelism.tensor_parallel_degree=0 must be >= 1", "--parallelism.tensor_parallel_degree=0")


@pytest.mark.parametrize("option", ["local_batch_size", "seq_len", "steps"])
def test_sizes_must_be_positive(option):
    _fails(rf"training.{option}=0 must be >= 1", f"--training.{option}=0")


def test_global_batch_size_is_minus_one_or_a_multiple_of_the_micro_batch():
    # 4 ranks, C = 2: data-parallel degree 2, local batch 2 -> 4 samples per micro-batch
    for ok in (-1, 4, 12):
        validate_job_config(_config(f"--training.global_batch_size={ok}"), world_size=4, cuda=False)
    for bad in (2, 6, 0):
        _fails(rf"training.global_batch_size={bad} must be -1 \(one micro-batch\) or a multiple of "
               r"training.local_batch_size x the data-parallel degree = 2 x 2 = 4",
               f"--training.global_batch_size={bad}", world=4)


def test_an_uneven_length_is_refused_naming_the_padding_option_or_padded():
    _fails(r"training.seq_len=509 is not divisible by parallelism.context_parallel_degree=2; "
           r"every rank must hold the same number of tokens; or set "
           r"context_parallel.pad_seq_len=true to pad each sample to 510 tokens",
           "--training.seq_len=509")
    usp = ("--context_parallel.style=usp", "--context_parallel.ulysses_degree=1")
    _fails(r"training.seq_len=510 must be divisible by 2 \* context_parallel_degree = 4 .*"
           r"pad each sample to 512 tokens", "--training.seq_len=510", *usp)
    shape = validate_job_config(_config("--training.seq_len=509", "--context_parallel.pad_seq_len"),
                                world_size=2, cuda=False)
    assert shape.seq_len == 510
    shape = validate_job_config(_config("--training.seq_len=510", "--context_parallel.pad_seq_len",
                                        *usp), world_size=2, cuda=False)
    assert shape.seq_len == 512
    _fails(r"context_parallel.pad_seq_len=true is not supported with style='ring'",
           "--context_parallel.style=ring", "--context_parallel.pad_seq_len", cuda=True)


def test_quantized_linear_converters_are_refused_where_the_weights_are_used_directly():
    fp8 = "--model.converters=quantize.linear.float8"
    _fails(r"model.converters=\['quantize.linear.float8'\] swap nn.Linear layers for quantized "
           r"ones, but context_parallel.style='upipe' \(wq, wk, wv inside its fused op\) compute "
           r"with the weights directly", fp8)
    _fails(r"memory.tiled_mlp=true \(w1, w2, w3\) and memory.chunked_loss=true \(output\)", fp8,
           "--memory.tiled_mlp", "--memory.chunked_loss", config="llama3_debug_ulysses.toml")
    validate_job_config(_config(fp8, config="llama3_debug_ulysses.toml"), world_size=2, cuda=False)


def test_packed_documents_go_with_the_all_to_all_styles_only():
    flex, varlen = "--model.flavor=debugmodel_flex_attn", "--model.flavor=debugmodel_varlen_attn"
    for style in ("upipe", "ulysses"):
        for flavor in (flex, varlen):
            validate_job_config(_config(f"--context_parallel.style={style}", flavor),
                                world_size=2, cuda=False)
    hybrid = ("--parallelism.context_parallel_degree=4", "--context_parallel.ulysses_degree=2")
    for style in ("usp", "upipe"):
        _fails(r"attn_mask_type='block_causal'.*without a ring dimension only.*leaves a ring of 2",
               f"--context_parallel.style={style}", *hybrid, flex, world=4)
    _fails(r"style='ring' applies TorchTitan's SDPA ring attention", "--context_parallel.style=ring",
           flex, cuda=True)
    _fails(r"compile.enable=true with model.flavor='debugmodel_flex_attn'.*use style='upipe'",
           "--context_parallel.style=ulysses", "--compile.enable",
           "--context_parallel.no-time-attention", flex)
    validate_job_config(_config("--compile.enable", "--context_parallel.no-time-attention", flex),
                        world_size=2, cuda=False)
    # without CP TorchTitan's own flex/varlen attention runs, which cannot train on a CPU
    _fails(r"cannot train on a CPU.*style='ulysses' or 'upipe'", "--context_parallel.style=none",
           "--parallelism.context_parallel_degree=1", flex, world=1)
    import dataclasses

    from torchtitan_upipe.titan.llama3 import FLAVORS

    sliding = dataclasses.replace(FLAVORS["debugmodel"], attn_mask_type="sliding")
    _fails(r"attn_mask_type='sliding'.*takes one of \['causal', 'block_causal'\]",
           model_args=sliding)


def test_keep_attention_output_choices_and_what_it_needs():
    full = ("--activation_checkpoint.mode=full", "--memory.offload_activations")
    for keep in ("none", "device", "host"):
        validate_job_config(_config(*full, f"--memory.keep_attention_output={keep}"),
                            world_size=2, cuda=False)
        validate_job_config(_config(*full, f"--memory.keep_attention_output={keep}",
                                    config="llama3_debug_ulysses.toml"), world_size=2, cuda=False)
    from torchtitan_upipe.titan.config import Memory

    with pytest.raises(ValueError, match=r"memory.keep_attention_output='disk' is not one of "
                                         r"\['none', 'device', 'host'\]"):
        Memory(keep_attention_output="disk")
    _fails(r"memory.keep_attention_output='device' replays the attention result in the recompute "
           r"of the plugin's offloaded checkpointing; set memory.offload_activations=true",
           "--activation_checkpoint.mode=full", "--memory.keep_attention_output=device")
    _fails(r"memory.keep_attention_output='host' needs the plugin's attention: "
           r"context_parallel.style one of \['ulysses', 'upipe', 'usp'\] with "
           r"context_parallel_degree > 1 \(got style='none', degree 1\)",
           *full, "--memory.keep_attention_output=host", world=1, config="llama3_debug_none.toml")
