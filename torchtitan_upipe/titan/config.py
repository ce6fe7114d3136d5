"""The ``[context_parallel]`` section this plugin adds to TorchTitan's JobConfig.

TorchTitan merges it in through ``--job.custom_config_module torchtitan_upipe.config`` (or
``[job] custom_config_module`` in TOML), so every field is set from TOML or the command line
like any TorchTitan option, e.g. ``--context_parallel.style upipe``::

    [parallelism]
    context_parallel_degree = 2     # TorchTitan's own option: C, the CP degree
    [context_parallel]
    style = "upipe"                 # "none" | "ulysses" | "upipe" | "ring" | "usp"
    upipe_chunk_heads = 0           # U for "upipe": query heads per stage across all C ranks (0 = C)
    ulysses_degree = 0              # hybrids: size of the all-to-all group (0 = C); ring = C / this
    kernel = "auto"                 # "auto" | "sdpa" | "cudnn" | "flash_attn" | "math"

Only choices are checked here; everything that depends on the model, the world size or the
device is checked by :func:`torchtitan_upipe.titan.checks.validate_job_config` before training
starts.  The styles are those of the registry in :mod:`.styles`.
"""


from dataclasses import dataclass, field

from ..cp.kernels import KERNEL_CHOICES
from ..cp.replay import KEEP_CHOICES


class ConfigError(ValueError):
    """An invalid combination of options, raised before training starts."""


@dataclass
class ContextParallel:
    style: str = "none"
    """Context-parallel attention: "none" | "ulysses" | "upipe" | "ring" (TorchTitan's built-in
    ring attention, CUDA only) | "usp" (Ulysses x ring hybrid)."""

    upipe_chunk_heads: int | str = 0
    """U for style "upipe": query heads processed per stage across the all-to-all's ranks. A
    multiple of ulysses_degree (C by default) that divides n_heads; 0 means that degree (the
    smallest, most memory-saving choice); "auto" takes, at config time, the largest valid U
    whose predicted peak fits the device less memory.reserve_gib (titan/fitting.py)."""

    ulysses_degree: int = 0
    """For hybrid styles: size of the all-to-all group (0 = C). Ring degree = C / this."""

    kernel: str = "auto"
    """Attention kernel: "auto" | "sdpa" | "cudnn" | "flash_attn" | "math"."""

    pad_seq_len: bool = False
    """Pad each sample to the next length the layout can split (a multiple of C, or of 2C with
    a ring) inside the plugin, when training.seq_len is not one: the padded tokens come after
    the real ones, so causal attention keeps them out of every real token's attention; their
    labels are ignored by the loss and they are not counted as tokens. false: such a
    seq_len is an error."""

    time_attention: bool = True
    """Log the attention share of step time (time_metrics/attention(%)) for the Ulysses-family
    styles; CUDA events, read only when metrics are logged."""

    def __post_init__(self) -> None:
        from .styles import get_style  # the registry imports the attention modules

        get_style(self.style)  # raises naming the option and the registered styles
        if self.kernel not in KERNEL_CHOICES:
            raise ValueError(
                f"context_parallel.kernel={self.kernel!r} is not one of {list(KERNEL_CHOICES)}"
            )
        if isinstance(self.upipe_chunk_heads, str) and self.upipe_chunk_heads.strip().isdigit():
            self.upipe_chunk_heads = int(self.upipe_chunk_heads)  # a TOML string "8"
        for name in ("upipe_chunk_heads", "ulysses_degree"):
            value = getattr(self, name)
            if name == "upipe_chunk_heads" and value == "auto":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                also = ' or "auto"' if name == "upipe_chunk_heads" else ""
                raise ValueError(
                    f"context_parallel.{name}={value!r} must be an integer >= 0 (0 = default)"
                    f"{also}"
                )


@dataclass
class Memory:
    """The long-context memory stack (any style can use it, so comparisons are fair)::

        [memory]
        offload_activations = true   # block inputs of full AC kept in (pinned) host memory
        offload_keep_layers = 1      # ... except the first k layers, kept on the device
        tiled_mlp = true             # MLP over sequence tiles (mlp_tiles, 0 = ceil(S/C / dim))
        tiled_norm = true            # RMSNorm over sequence tiles (norm_tiles, 0 = same rule)
        chunked_loss = true          # output projection + loss over chunks (loss_chunks, 0 = 1K-token chunks)
        keep_attention_output = "host"  # one attention forward per step: kept with the block input
        fuse_output_projection = true   # UPipe applies wo in its op: no full-width gradient of wo's input
        offload_optimizer_state = true  # Adam's state in host memory during forward and backward
    """

    offload_activations: bool = False
    """Offload each checkpointed block input to pinned host memory (needs
    activation_checkpoint.mode = "full"); copies run on a side stream."""

    offload_keep_layers: int = 1
    """Keep the inputs of the first k layers on the device."""

    offload_pinned: bool = True
    """Page-lock the offloaded inputs' host buffers (exactly their size): asynchronous copies.
    false keeps them pageable: no page-locked memory (for long contexts whose inputs exceed
    what the host can lock), copies the host waits for."""

    offload_prefetch: bool = True
    """Copy the previous layer's input back while a layer runs its backward (overlap); false
    saves one block input of device memory at the step's peak for an exposed copy per layer."""

    offload_refetch_input: bool = False
    """Free each offloaded layer's reloaded input once its recompute has run and copy it back
    from its host buffer for the attention norm's backward, the last step that reads it: one
    block input less on the device through the layer's backward, for one more host-to-device
    copy per layer (exact). Needs offload_activations = true."""

    offload_stride: int = 1
    """Segment checkpointing: of the offloaded layers (from offload_keep_layers on), only
    every k-th keeps its input in host memory; the backward regenerates the k - 1 inputs
    between from it (k - 1 more block forwards per segment of k layers, about +12% compute at
    k = 2). Host memory for the block inputs is divided by about k (k - 1 scratch buffers are
    shared by all segments); device memory is unchanged. Must divide the number of offloaded
    layers. Needs offload_activations = true; not with keep_attention_output."""

    offload_inplace_residual_grads: bool = False
    """The recompute sums each block's residual gradients in place, into the storage of the
    gradient arriving from the block above, instead of into new tensors: one gradient of the
    block's size less through the attention's backward, where a layer peaks. Exact: the same
    additions, bit for bit with tiled_norm; TorchTitan's composite RMSNorm adds its two input
    gradient terms in another order (equal within rounding). Blocks must run TorchTitan's
    Llama3 TransformerBlock.forward. Needs offload_activations = true."""

    fuse_output_projection: bool = False
    """UPipe's op applies the attention's output projection ``wo`` itself: its backward makes
    each stage's columns of wo's input gradient from the block's gradient, so the full-width
    ``(B, S/C, H*D)`` gradient never exists (one block-sized tensor less where a layer's
    backward peaks, no extra FLOPs). The forward is TorchTitan's GEMM, bit for bit; the
    backward's GEMMs are split by columns (equal within rounding). Style upipe (and its ring
    hybrid) only."""

    keep_attention_output: str = "none"
    """Keep each layer's attention result (output and LSE) from the forward, so the
    backward's recompute does not run the attention kernel forward again (one attention
    forward per step instead of two; exact): "none" | "device" (kept on the device) | "host"
    (kept in host memory next to the offloaded block inputs, copied and prefetched with them;
    also for the layers of offload_keep_layers). Styles ulysses, usp and upipe, with
    offload_activations = true."""

    offload_optimizer_state: bool = False
    """Keep the optimizer's state (Adam's exp_avg and exp_avg_sq, 8 bytes per parameter over
    the FSDP ranks) in host memory while the forward and backward run, where the step peaks,
    and copy it back for the optimizer step (exact: the same bytes). Host buffers of exactly
    its size, page-locked unless offload_pinned = false. Optimizers Adam and AdamW; not with
    optimizer.early_step_in_backward."""

    tiled_mlp: bool = False
    mlp_tiles: int = 0
    """Tiles for tiled_mlp; 0 = ceil(local sequence length / dim)."""

    tiled_norm: bool = False
    norm_tiles: int = 0
    """Tiles for tiled_norm; 0 = ceil(local sequence length / dim)."""

    chunked_loss: bool = False
    loss_chunks: int = 0
    """Chunks for chunked_loss; 0 = chunks of about 1024 tokens."""

    device_gib: float = 0.0
    """Device memory per rank that context_parallel.upipe_chunk_heads = "auto" fits in, GiB;
    0 = this CUDA device's (capped by benchmark.device_memory_gib). Required for "auto" on CPU."""

    reserve_gib: float = 4.0
    """Of that memory, what "auto" keeps free of the predicted peak (the CUDA context, NCCL
    buffers, fragmentation: what the memory model leaves out), GiB."""

    def __post_init__(self) -> None:
        for name in ("offload_keep_layers", "mlp_tiles", "norm_tiles", "loss_chunks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"memory.{name}={value!r} must be an integer >= 0")
        k = self.offload_stride
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"memory.offload_stride={k!r} must be an integer >= 1 "
                             f"(1 = every offloaded layer keeps its input on the host)")
        for name in ("device_gib", "reserve_gib"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"memory.{name}={value!r} must be a number of GiB >= 0")
        if self.keep_attention_output not in KEEP_CHOICES:
            raise ValueError(f"memory.keep_attention_output={self.keep_attention_output!r} is "
                             f"not one of {list(KEEP_CHOICES)}")


@dataclass
class Benchmark:
    """Options for measuring (scripts/bench_one_rank.py); leave at defaults for training."""

    n_layers: int = 0
    """Build only the first n transformer layers of the flavor (per-layer scaling
    measurements: time and memory at 1 and 2 layers, then extrapolate); 0 = all layers."""

    fake_rank: int = 0
    """With ``comm.mode = "fake_backend"`` (this process is one rank of an NGPU-rank job, its
    collectives no-ops), be rank ``fake_rank`` of the job instead of TorchTitan's rank 0.
    All-to-all styles do the same work on every rank; a causal zigzag ring does not (ranks
    merge different blocks), so a one-rank measurement of a ring must choose its rank."""

    device_memory_gib: float = 0.0
    """Cap this process's CUDA memory to this many GiB before anything is allocated
    (``torch.cuda.set_per_process_memory_fraction``), so a larger GPU measures like a smaller
    one: the H100 configs set 80.  0 = no cap; a cap at or above the device's memory is none."""

    synthetic_document_len: int = 0
    """With ``training.dataset = "synthetic"``: pack each sample with documents of random
    lengths (geometric, this mean; each ends with the flavor's ``eos_id``), the input of
    ``block_causal`` flavors.  0 = no document boundaries (random tokens only)."""

    def __post_init__(self) -> None:
        for name in ("n_layers", "fake_rank", "synthetic_document_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"benchmark.{name}={value!r} must be an integer >= 0")
        cap = self.device_memory_gib
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap >= 0:
            raise ValueError(
                f"benchmark.device_memory_gib={cap!r} must be a number of GiB >= 0 (0 = no cap)")


@dataclass
class Checkpoint:
    """Merged into TorchTitan's ``[checkpoint]`` section (its options stay as they are)."""

    on_schedule_change: str = "error"
    """Resuming from a checkpoint trained on another LR schedule (training.steps or
    lr_scheduler.total_steps, warmup, decay, min_lr_factor, optimizer.lr): "error" stops with
    what changed; "rebuild" follows this run's schedule from the saved step on (titan/resume.py).
    Checked by the config checks: TorchTitan's merged section runs its own __post_init__ only."""


@dataclass
class JobConfig:
    """Merged into TorchTitan's JobConfig by its ConfigManager."""

    context_parallel: ContextParallel = field(default_factory=ContextParallel)
    memory: Memory = field(default_factory=Memory)
    benchmark: Benchmark = field(default_factory=Benchmark)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
