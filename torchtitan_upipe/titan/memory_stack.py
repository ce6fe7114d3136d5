"""The ``[memory]`` stack on TorchTitan's Llama3: module swaps and the offloaded checkpoint.

Order matters and mirrors TorchTitan's parallelize: tiling and the chunked loss change
modules in place (:func:`apply_tiling`, before activation checkpointing and FSDP wrap them);
offloaded activation checkpointing (:func:`apply_offloaded_checkpointing`) replaces
TorchTitan's checkpoint wrapper.  Every swap keeps the parameters, their FQNs and the state
dict: only instances' classes change.

* :data:`TiledFeedForward`: TorchTitan's ``FeedForward`` computing
  :func:`~torchtitan_upipe.memory.tiled_mlp` (``memory.tiled_mlp``).
* :class:`~torchtitan_upipe.memory.TiledRMSNorm` for the blocks' norms and the final norm
  (``memory.tiled_norm``).
* :class:`ChunkedLossOutput`: the output layer computing the loss in place of the logits
  (``memory.chunked_loss``).
* :func:`apply_offloaded_checkpointing`: :func:`~torchtitan_upipe.memory.apply_offloaded_ac`
  with the trainer's :class:`~torchtitan_upipe.memory.HostOffloader`
  (``memory.offload_activations``, ``offload_keep_layers``, ``offload_prefetch``,
  ``keep_attention_output``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchtitan.models.llama3.model.model import FeedForward, TransformerBlock

from ..memory import (
    HostOffloader,
    apply_offloaded_ac,
    apply_tiled_mlp,
    apply_tiled_rms_norm,
    auto_num_tiles,
    chunked_cross_entropy,
    tiled_mlp_class,
)

DEFAULT_CHUNK_TOKENS = 1024
"""``memory.loss_chunks = 0``: chunks of about this many tokens."""

TiledFeedForward = tiled_mlp_class(FeedForward)
"""TorchTitan's Llama3 ``FeedForward`` running the tiled MLP (same parameters, same state-dict
keys ``w1.weight``/``w2.weight``/``w3.weight``, same ``init_weights``); ``num_tiles`` is an
``__init__`` keyword.  :func:`~torchtitan_upipe.memory.apply_tiled_mlp` turns a
``FeedForward`` into one."""


class ChunkedLossOutput(nn.Linear):
    """TorchTitan's ``output`` ``nn.Linear`` (same ``output.weight``) whose forward returns the
    sum-reduced cross entropy of its logits instead of the logits.

    TorchTitan's trainer computes ``loss_fn(model(inputs), labels)``, which materializes the
    ``(B, S/C, vocab)`` logits (hundreds of GB at millions of tokens).  Here the trainer hands
    the labels over just before the forward (:meth:`set_labels`;
    :class:`~torchtitan_upipe.titan.trainer.UPipeTrainer` does), and the forward computes
    :func:`~torchtitan_upipe.memory.chunked_cross_entropy` over sequence chunks.  It runs inside
    the FSDP unit that owns ``output.weight``, so the weight is unsharded when it is used.  The
    train spec's loss function then passes that scalar through.
    """

    num_chunks: int = 0
    _labels: torch.Tensor | None = None

    def set_labels(self, labels: torch.Tensor) -> None:
        self._labels = labels

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        labels, self._labels = self._labels, None
        if labels is None:
            raise RuntimeError(
                "memory.chunked_loss: the output layer got no labels for this forward; the "
                "trainer must call set_labels(labels) before each forward (UPipeTrainer does)"
            )
        tokens = h.shape[0] * h.shape[1]
        chunks = self.num_chunks or max(1, math.ceil(tokens / DEFAULT_CHUNK_TOKENS))
        return chunked_cross_entropy(h, self.weight, labels, chunks)


def apply_chunked_loss(output: nn.Linear, num_chunks: int = 0) -> ChunkedLossOutput:
    """Turn TorchTitan's ``output`` layer into a :class:`ChunkedLossOutput` in place."""
    if output.bias is not None:
        raise ValueError("memory.chunked_loss needs a bias-free output layer")
    output.__class__ = ChunkedLossOutput
    output.num_chunks = num_chunks
    return output


def apply_tiling(model: nn.Module, mem, local_seq_len: int) -> None:
    """Tiled MLP / RMSNorm and the chunked loss head, as ``mem`` (the [memory] section) asks.
    A tile count of 0 is :func:`~torchtitan_upipe.memory.auto_num_tiles` of the local length."""
    dim = model.model_args.dim
    mlp_tiles = mem.mlp_tiles or auto_num_tiles(local_seq_len, dim)
    norm_tiles = mem.norm_tiles or auto_num_tiles(local_seq_len, dim)
    for block in model.layers.values():
        if mem.tiled_mlp:
            apply_tiled_mlp(block.feed_forward, mlp_tiles)
        if mem.tiled_norm:
            apply_tiled_rms_norm(block.attention_norm, norm_tiles)
            apply_tiled_rms_norm(block.ffn_norm, norm_tiles)
    if mem.tiled_norm and model.norm is not None:
        apply_tiled_rms_norm(model.norm, norm_tiles)
    if mem.chunked_loss:
        apply_chunked_loss(model.output, mem.loss_chunks)


def describe(mem, local_seq: int, batch: int, dim: int, n_layers: int) -> list[str]:
    """One line per ``[memory]`` option that is on, with the values it takes effect with
    (``local_seq`` tokens per rank and sample, ``batch`` samples per rank)."""

    def tiles(name: str, value: int) -> str:
        n = value or auto_num_tiles(local_seq, dim)
        rule = f"{name}=0: ceil({local_seq} / dim {dim})" if not value else f"{name}={value}"
        return f"{n} tiles of <= {math.ceil(local_seq / n)} tokens per sample ({rule})"

    lines = []
    if mem.tiled_mlp:
        lines.append(f"memory.tiled_mlp: the MLP over {tiles('mlp_tiles', mem.mlp_tiles)}")
    if mem.tiled_norm:
        lines.append(f"memory.tiled_norm: RMSNorm over {tiles('norm_tiles', mem.norm_tiles)}")
    if mem.chunked_loss:
        auto = max(1, math.ceil(batch * local_seq / DEFAULT_CHUNK_TOKENS))
        n = mem.loss_chunks or min(auto, local_seq)
        rule = (f"loss_chunks={mem.loss_chunks}" if mem.loss_chunks
                else f"loss_chunks=0: about {DEFAULT_CHUNK_TOKENS} tokens each")
        lines.append(f"memory.chunked_loss: output projection and loss over {n} chunks of "
                     f"<= {math.ceil(local_seq / n)} tokens per sample ({rule})")
    if mem.offload_activations:
        def layers(a: int, b: int) -> str:
            return f"layer {a}" if a == b else f"layers {a}-{b}"

        keep = min(mem.offload_keep_layers, n_layers)
        kept = f"{layers(0, keep - 1)} kept on the device" if keep else "none kept on the device"
        which = layers(keep, n_layers - 1) if keep < n_layers else "no layer"
        lines.append(
            f"memory.offload_activations: block inputs of {which} ({n_layers - keep} of "
            f"{n_layers}) in {'pinned' if mem.offload_pinned else 'pageable'} host memory, "
            f"{kept} (offload_keep_layers={mem.offload_keep_layers}); prefetch "
            f"{'on' if mem.offload_prefetch else 'off'}"
            + ("; each input freed after its recompute and refetched for the attention norm's "
               "backward (offload_refetch_input)" if mem.offload_refetch_input else "")
            + ("; residual gradients summed in place (offload_inplace_residual_grads)"
               if mem.offload_inplace_residual_grads else "")
            + (f"; segments of {mem.offload_stride}: only each segment's first input on the "
               f"host, the others regenerated in the backward (offload_stride)"
               if mem.offload_stride > 1 else ""))
    keep = mem.keep_attention_output
    if keep != "none":
        where = ("on the device" if keep == "device" else
                 "in host memory, copied and prefetched with the block inputs")
        lines.append(f"memory.keep_attention_output={keep!r}: each layer's attention output and "
                     f"LSE kept from the forward {where}; the recompute replays them instead of "
                     f"running the attention kernel forward")
    if mem.fuse_output_projection:
        lines.append("memory.fuse_output_projection: UPipe's op applies wo; its backward makes "
                     "each stage's output gradient from the block's (no full-width gradient of "
                     "wo's input)")
    if mem.offload_optimizer_state:
        lines.append(f"memory.offload_optimizer_state: the optimizer's state in "
                     f"{'pinned' if mem.offload_pinned else 'pageable'} host memory during the "
                     f"forward and backward, back on the device for the optimizer step")
    return lines


def check_torchtitan_blocks(model: nn.Module) -> None:
    """``memory.offload_inplace_residual_grads`` recomputes each block as TorchTitan's Llama3
    ``TransformerBlock.forward`` does: refuse a block whose ``forward`` is another."""
    for name, block in model.layers.items():
        if type(block).forward is not TransformerBlock.forward:
            raise ValueError(
                f"memory.offload_inplace_residual_grads: layer {name}'s block "
                f"({type(block).__name__}) does not run TorchTitan's Llama3 "
                f"TransformerBlock.forward, whose residual structure the in-place gradient sums "
                f"follow; set memory.offload_inplace_residual_grads=false")


def apply_offloaded_checkpointing(model: nn.Module, mem, offloader: HostOffloader) -> None:
    """Full activation checkpointing with the inputs of layers ``>= mem.offload_keep_layers``
    kept in ``offloader``'s host buffers (needs ``activation_checkpoint.mode = "full"``), and
    each attention's result kept for the recompute as ``mem.keep_attention_output`` says."""
    if mem.offload_inplace_residual_grads:
        check_torchtitan_blocks(model)
    apply_offloaded_ac(model, offloader, mem.offload_keep_layers, mem.offload_prefetch,
                       keep_attention_output=mem.keep_attention_output,
                       refetch_input=mem.offload_refetch_input,
                       inplace_residual_grads=mem.offload_inplace_residual_grads,
                       stride=mem.offload_stride)
