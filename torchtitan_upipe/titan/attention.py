"""The attention module a context-parallel style installs in every transformer block.

:class:`ContextParallelAttention` takes over a TorchTitan Llama3 ``Attention``'s ``wq``, ``wk``,
``wv`` and ``wo`` children under the same names, so parameter FQNs, ``init_weights`` and the
state dict are exactly TorchTitan's (checkpoints move freely between this plugin, plain
TorchTitan and, through TorchTitan's adapter, HF Llama).  What happens between the block's
normed input and ``wo`` is delegated to a strategy:

* :class:`UlyssesStrategy` -- project, RoPE, :func:`~torchtitan_upipe.ulysses_attention`
  (style ``ulysses``; with a ring group, style ``usp``: each head group's attention is a
  ring pass, :class:`~torchtitan_upipe.cp.ring.RingKernel`).
* :class:`UPipeStrategy` -- :func:`~torchtitan_upipe.upipe_attention`, which owns the
  projections so full-width Q/K/V never exist (with a ring group: UPipe x ring).  With
  ``memory.fuse_output_projection`` it owns ``wo`` too (``applies_wo``): the op returns the
  module's output and its backward never makes the full-width gradient of ``wo``'s input.

Packed documents (``attn_mask_type = "block_causal"``): the trainer passes the batch's
:class:`~torchtitan_upipe.cp.documents.Documents` as ``attention_masks`` (TorchTitan's
argument for its flex/varlen masks), and both strategies compute the document-masked causal
attention (:class:`~torchtitan_upipe.cp.documents.DocumentKernel`) over the whole sequence
their all-to-all gathers.  Without a ring only: a ring rank holds a piece of the sequence.

Kept attention results (``memory.keep_attention_output``): the offloaded checkpoint gives
each module an :class:`~torchtitan_upipe.cp.replay.AttentionSlot` (``kept``), which both
strategies pass on, so the backward's recompute replays the forward's attention result.

Inputs follow the trainer's sharding contract (:mod:`.sharding`): ``x`` is
``(B, S/C, dim)`` and ``positions`` ``(B, S/C)`` holds the global positions of those tokens.
:func:`check_sharding_once` installs a hook on the model that checks, on the first forward
only (one host synchronization), that ``positions`` is the shard the sharder defines, so a
trainer that shards differently fails loudly instead of computing something else.
"""

from __future__ import annotations

import abc

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from torchtitan.models.llama3.model.model import Attention, apply_rotary_emb

from ..cp.documents import Documents
from ..cp.kernels import AttentionKernel
from ..cp.replay import AttentionSlot
from ..cp.ring import RingKernel
from ..cp.ulysses import ulysses_attention
from ..cp.upipe import upipe_attention
from .groups import CPGroups
from .metrics import AttentionTimer, timed
from .sharding import SequenceSharder


def check_sharding_once(model: nn.Module, sharder: SequenceSharder) -> None:
    """Verify on the model's first forward that ``positions`` follows ``sharder``.

    Runs outside the compiled transformer blocks (a hook on the root module) and removes
    itself after the first call.
    """

    def hook(module, args, kwargs):
        positions = kwargs.get("positions")
        if positions is None:
            raise RuntimeError(
                "context-parallel attention needs the global positions of the local tokens; "
                "launch through torchtitan_upipe's train.py (UPipeTrainer), which shards them"
            )
        local_len = positions.shape[-1]
        expected = sharder.indices(local_len * sharder.degree, positions.device)
        # under the CPU memory estimator positions are fake: shapes only, no values to compare
        if not is_fake(positions) and not torch.equal(positions[0].to(expected.dtype), expected):
            raise RuntimeError(
                f"context-parallel inputs are not sharded as {type(sharder).__name__} expects "
                f"(see torchtitan_upipe.titan.sharding); TorchTitan's head-tail load balancer is "
                f"for style='ring' only"
            )
        handle.remove()

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)


class CPAttentionStrategy(abc.ABC):
    """Computes ``(B, S/C, H*D)`` (the input of ``wo``) from this rank's normed block input,
    or, where ``applies_wo``, the module's output ``(B, S/C, dim)`` (``wo`` applied)."""

    applies_wo = False

    def __init__(self, groups: CPGroups) -> None:
        self.groups = groups

    @abc.abstractmethod
    def __call__(self, attn: "ContextParallelAttention", x, freqs_cis, positions,
                 documents: Documents | None = None) -> torch.Tensor:
        """``documents``: the packed documents of the batch (``None``: causal attention)."""


class UlyssesStrategy(CPAttentionStrategy):
    def __init__(self, groups: CPGroups, kernel: AttentionKernel) -> None:
        super().__init__(groups)
        self.kernel = RingKernel(groups.ring, kernel) if groups.ring is not None else kernel

    def __call__(self, attn, x, freqs_cis, positions, documents=None):
        bs, seqlen, _ = x.shape
        xq = attn.wq(x).view(bs, seqlen, -1, attn.head_dim)
        xk = attn.wk(x).view(bs, seqlen, -1, attn.head_dim)
        xv = attn.wv(x).view(bs, seqlen, -1, attn.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis, positions=positions)
        out = ulysses_attention(xq, xk, xv, group=self.groups.ulysses, causal=True,
                                kernel=self.kernel, documents=documents, keep=attn.kept)
        return out.reshape(bs, seqlen, -1)


class UPipeStrategy(CPAttentionStrategy):
    """``inline``: run UPipe without its custom-op boundary (the CPU memory estimator's fake
    tensors need it; same values).  ``fuse_wo``: the op applies ``wo`` too
    (``memory.fuse_output_projection``; ``wo`` must be TorchTitan's bias-free ``nn.Linear``,
    :func:`check_fusable_wo`)."""

    def __init__(self, groups: CPGroups, kernel: str, chunk_heads: int, inline: bool = False,
                 fuse_wo: bool = False) -> None:
        super().__init__(groups)
        self.kernel, self.chunk_heads, self.inline = kernel, chunk_heads, inline
        self.applies_wo = fuse_wo

    def __call__(self, attn, x, freqs_cis, positions, documents=None):
        seqlen = x.shape[1]
        # every batch row of a shard holds the same positions (SequenceSharder.positions); with
        # the local RoPE table (titan/llama3.py) positions is None and the table is local
        local_freqs = freqs_cis[positions[0]] if positions is not None else freqs_cis[:seqlen]
        return upipe_attention(
            x, attn.wq.weight, attn.wk.weight, attn.wv.weight, local_freqs,
            n_heads=attn.n_heads, n_kv_heads=attn.n_kv_heads, chunk_heads=self.chunk_heads,
            group=self.groups.ulysses, ring_group=self.groups.ring, causal=True, kernel=self.kernel,
            inline=self.inline, documents=documents, keep=attn.kept,
            wo=attn.wo.weight if self.applies_wo else None,
        )


def check_fusable_wo(attention: nn.Module) -> None:
    """``memory.fuse_output_projection`` computes ``wo``'s GEMM inside the UPipe op, so
    ``wo`` must be a plain bias-free ``nn.Linear`` (TorchTitan's): a converted one (Float8,
    a LoRA wrapper, a bias) would otherwise be bypassed."""
    wo = attention.wo
    if type(wo) is not nn.Linear or wo.bias is not None:
        raise ValueError(
            f"memory.fuse_output_projection=true applies wo inside the UPipe op, but this "
            f"model's wo is {type(wo).__name__}{'' if wo.bias is None else ' with a bias'}, not "
            f"TorchTitan's bias-free nn.Linear (a model converter changed it?); set "
            f"memory.fuse_output_projection=false")


class ContextParallelAttention(nn.Module):
    """Drop-in for TorchTitan's Llama3 ``Attention`` with the same parameters and FQNs."""

    def __init__(
        self, attention: Attention, strategy: CPAttentionStrategy, timer: AttentionTimer | None = None
    ) -> None:
        super().__init__()
        self.n_heads = attention.n_heads
        self.n_kv_heads = attention.n_kv_heads
        self.head_dim = attention.head_dim
        self.wq, self.wk, self.wv, self.wo = attention.wq, attention.wk, attention.wv, attention.wo
        self.strategy = strategy
        self.timer = timer  # the attention-time metric (CPMetricsProcessor); None = off
        self.kept: AttentionSlot | None = None
        """This layer's kept attention result (``memory.keep_attention_output``; the
        offloaded checkpoint sets it, :func:`~torchtitan_upipe.memory.apply_offloaded_ac`)."""

    def init_weights(self, init_std: float) -> None:
        Attention.init_weights(self, init_std)  # same initialization as TorchTitan's module

    def forward(self, x, freqs_cis, attention_masks, positions=None):
        if attention_masks is not None and not isinstance(attention_masks, Documents):
            raise TypeError(
                f"context-parallel attention takes the batch's Documents as attention_masks "
                f"(attn_mask_type='block_causal', made by UPipeTrainer), not "
                f"{type(attention_masks).__name__}"
            )
        out = timed(self.timer,
                    lambda h: self.strategy(self, h, freqs_cis, positions, attention_masks), x)
        return out if self.strategy.applies_wo else self.wo(out)

    def extra_repr(self) -> str:
        return f"strategy={type(self.strategy).__name__}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}"
