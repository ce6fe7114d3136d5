"""TorchTitan's Llama3 with one generalization: an explicit ``head_dim``.

The paper's "32B" model is the Llama3 architecture at Qwen3-32B sizes: ``dim = 5120`` but 64
query heads of ``head_dim = 128`` (query width 8192 != dim).  TorchTitan 0.2.2's Llama3 derives
``head_dim = dim // n_heads``.  These subclasses accept ``head_dim`` and are otherwise
TorchTitan's modules: the same parameter names and shapes for every TorchTitan flavor, so
checkpoints of the existing flavors load unchanged (TorchTitan's flavors are used as is;
only ``32B`` sets ``head_dim``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from torchtitan.models.llama3 import llama3_args
from torchtitan.models.llama3.model import model as tt
from torchtitan.models.llama3.model.args import TransformerModelArgs
from torchtitan.models.utils import get_dense_model_nparams_and_flops


@dataclass
class LlamaArgs(TransformerModelArgs):
    head_dim: int | None = None
    """Per-head dimension; ``None`` means TorchTitan's ``dim // n_heads``."""

    def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
        return get_dense_model_nparams_and_flops(self, model, 2 * head_dim_of(self), seq_len)

    def update_from_config(self, job_config, **kwargs) -> None:
        if self.attn_type == "varlen" and _plugin_attention(job_config):
            # TorchTitan refuses varlen under its CP; this plugin's styles compute the mask
            self.attn_type = "sdpa"
            try:
                super().update_from_config(job_config, **kwargs)
            finally:
                self.attn_type = "varlen"
        else:
            super().update_from_config(job_config, **kwargs)
        from .shape import model_seq_len  # the RoPE table covers the padded length

        self.max_seq_len = max(self.max_seq_len, model_seq_len(job_config))
        bench = getattr(job_config, "benchmark", None)
        if bench is not None and bench.n_layers:
            if bench.n_layers > self.n_layers:
                raise ValueError(
                    f"benchmark.n_layers={bench.n_layers} exceeds the flavor's {self.n_layers} layers"
                )
            self.n_layers = bench.n_layers


def _plugin_attention(job_config) -> bool:
    """Whether this plugin's attention replaces the flavor's (a Ulysses-family CP style)."""
    from .styles import style_names, get_style

    cp = getattr(job_config, "context_parallel", None)
    return (cp is not None and job_config.parallelism.context_parallel_degree > 1
            and cp.style in style_names() and get_style(cp.style).uses_all_to_all)


def _as_llama_args(args: TransformerModelArgs) -> LlamaArgs:
    """A TorchTitan flavor as :class:`LlamaArgs` (same values; head_dim derived)."""
    return LlamaArgs(**{f.name: getattr(args, f.name) for f in dataclasses.fields(args)})


def head_dim_of(args: TransformerModelArgs) -> int:
    return getattr(args, "head_dim", None) or args.dim // args.n_heads


class Attention(tt.Attention):
    def __init__(self, model_args: TransformerModelArgs) -> None:
        super().__init__(model_args)
        hd = head_dim_of(model_args)
        if hd != self.head_dim:
            self.head_dim = hd
            dim = model_args.dim
            self.wq = nn.Linear(dim, self.n_heads * hd, bias=False)
            self.wk = nn.Linear(dim, self.n_kv_heads * hd, bias=False)
            self.wv = nn.Linear(dim, self.n_kv_heads * hd, bias=False)
            self.wo = nn.Linear(self.n_heads * hd, dim, bias=False)


class TransformerBlock(tt.TransformerBlock):
    def __init__(self, layer_id: int, model_args: TransformerModelArgs) -> None:
        super().__init__(layer_id, model_args)
        if head_dim_of(model_args) != model_args.dim // model_args.n_heads:
            self.attention = Attention(model_args)


def rope_frequencies(head_dim: int, theta: float, scaling) -> torch.Tensor:
    """The per-pair RoPE frequencies of TorchTitan's ``precompute_freqs_cis`` (Llama 3.1 scaling:
    long wavelengths divided by ``scaling_factor``, a smooth blend between the two cut-offs),
    computed with the same float32 operations in the same order, so tables built from it are
    bit-identical to TorchTitan's rows (tested)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    factor, low, high = scaling.scaling_factor, scaling.low_freq_factor, scaling.high_freq_factor
    original = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / freqs
    freqs = torch.where(wavelen > original / low, freqs / factor, freqs)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    medium = ~(wavelen < original / high) * ~(wavelen > original / low)
    return torch.where(medium, blended, freqs)


class Transformer(tt.Transformer):
    """TorchTitan's Llama3 ``Transformer``; blocks honour ``model_args.head_dim``.

    With :meth:`use_local_rope` (context parallelism), the RoPE table holds only the rows of
    this rank's positions, in local order, instead of all ``S`` rows on every rank (TorchTitan's
    complex64 table is 2.7 GB at 5M tokens for head_dim 128); the blocks then get the local
    table and no ``positions``, exactly as a model on one device gets its table.
    """

    _rope_positions: torch.Tensor | None = None  # set by use_local_rope
    rope_table_builds = 0
    """How many times this model has built its RoPE table: once per ``init_weights``, never
    in a step (the forward reads the ``freqs_cis`` buffer)."""

    def __init__(self, model_args: TransformerModelArgs) -> None:
        super().__init__(model_args)
        if head_dim_of(model_args) != model_args.dim // model_args.n_heads:
            for layer_id in range(model_args.n_layers):
                self.layers[str(layer_id)] = TransformerBlock(layer_id, model_args)

    def use_local_rope(self, positions: torch.Tensor) -> None:
        """Keep only the RoPE rows of ``positions`` (this rank's global positions, local order).

        Call before ``init_weights`` (TorchTitan's parallelize hook runs before it); the
        forward's ``positions`` must then be those positions (the sharding guard checks it).
        """
        self._rope_positions = positions.detach().to("cpu", torch.long)

    def _precompute_freqs_cis(self):
        self.rope_table_builds += 1
        a = self.model_args
        hd = head_dim_of(a)
        if self._rope_positions is None:
            return tt.precompute_freqs_cis(hd, a.max_seq_len, a.rope_theta, a.rope_scaling_args)
        freqs = rope_frequencies(hd, a.rope_theta, a.rope_scaling_args)
        angles = torch.outer(self._rope_positions.to(freqs.device), freqs).float()
        return torch.polar(torch.ones_like(angles), angles)

    def forward(self, tokens, attention_masks=None, positions=None):
        if self._rope_positions is not None:
            positions = None  # the table is already this rank's rows, in local order
        return super().forward(tokens, attention_masks=attention_masks, positions=positions)


FLAVORS: dict[str, TransformerModelArgs] = {
    **{name: _as_llama_args(args) for name, args in llama3_args.items()},
    # The paper's "Qwen3-32B": Llama3 architecture with Qwen3-32B sizes, no QK-norm.
    # ffn: int(2 * 4 * 5120 / 3) = 13653 -> * 1.875 = 25599 -> multiple of 256 = 25600
    "32B": LlamaArgs(
        dim=5120,
        n_layers=64,
        n_heads=64,
        n_kv_heads=8,
        head_dim=128,
        ffn_dim_multiplier=1.875,
        multiple_of=256,
        rope_theta=1_000_000,
        vocab_size=151936,
    ),
}
# packed documents: TorchTitan's convention for its 8B (8B_flex), here for the 32B too
FLAVORS["32B_flex"] = dataclasses.replace(FLAVORS["32B"], attn_type="flex",
                                          attn_mask_type="block_causal")
