"""Apply the long-context memory stack configured in ``[memory]`` to a Llama3 model.

Order matters and mirrors TorchTitan's parallelize: tiling and the chunked loss change
modules in place (before activation checkpointing and FSDP wrap them); offloaded
activation checkpointing replaces TorchTitan's checkpoint wrapper.
"""

from __future__ import annotations

from torch import nn

from ..memory.head import apply_chunked_loss
from ..memory.tiled_mlp import apply_tiled_mlp, auto_num_tiles
from ..memory.tiled_norm import apply_tiled_rms_norm


def apply_tiling(model: nn.Module, mem, local_seq_len: int) -> None:
    """Tiled MLP / RMSNorm and the chunked loss head, as ``mem`` (the [memory] section) asks."""
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
