"""Exact, sequence-tiled replacements for the memory-dominant pieces of a long-context step.

* :func:`tiled_mlp` / :func:`apply_tiled_mlp`: the SwiGLU MLP whose (tokens, hidden)
  intermediates exist for one sequence tile at a time.
* :func:`tiled_rms_norm` / :func:`apply_tiled_rms_norm` / :class:`TiledRMSNorm`: RMSNorm
  whose op-math (float32) temporaries exist for one tile at a time.
* :func:`chunked_cross_entropy`: output projection + TorchTitan's sum-reduced cross entropy
  without ever materializing the (B, S, vocab) logits.
* :func:`apply_offloaded_ac` / :class:`HostOffloader`: whole-block activation checkpointing
  with the block inputs kept in host memory (side-stream copies, prefetch one layer ahead),
  in buffers of exactly their size, pinned or pageable (:class:`HostMemory`).
* :class:`OptimizerStateOffloader`: the optimizer's state in host memory during the forward
  and backward, back on the device for the optimizer step.

Torch only (this layer never imports TorchTitan); :mod:`torchtitan_upipe.titan.memory_stack`
applies them to TorchTitan's Llama3 as the ``[memory]`` options say.

Each is a pure forward/backward pair (``*_forward`` / ``*_backward``) behind a thin
``torch.autograd.Function``; the backward recomputes per tile instead of saving the large
intermediate.
"""

from .chunked_loss import (
    IGNORE_INDEX,
    chunked_cross_entropy,
    chunked_cross_entropy_backward,
    chunked_cross_entropy_forward,
)
from .tiled_mlp import (
    TiledMLPMixin,
    apply_tiled_mlp,
    auto_num_tiles,
    tiled_mlp,
    tiled_mlp_backward,
    tiled_mlp_class,
    tiled_mlp_forward,
)
from .host import HostMemory
from .offload import HostOffloader, apply_offloaded_ac
from .optimizer_state import OptimizerStateOffloader
from .tiled_norm import (
    TiledRMSNorm,
    apply_tiled_rms_norm,
    tiled_rms_norm,
    tiled_rms_norm_backward,
    tiled_rms_norm_forward,
)

__all__ = [
    "HostMemory",
    "HostOffloader",
    "IGNORE_INDEX",
    "OptimizerStateOffloader",
    "apply_offloaded_ac",
    "chunked_cross_entropy",
    "chunked_cross_entropy_backward",
    "chunked_cross_entropy_forward",
    "TiledMLPMixin",
    "apply_tiled_mlp",
    "auto_num_tiles",
    "tiled_mlp",
    "tiled_mlp_backward",
    "tiled_mlp_class",
    "tiled_mlp_forward",
    "TiledRMSNorm",
    "apply_tiled_rms_norm",
    "tiled_rms_norm",
    "tiled_rms_norm_backward",
    "tiled_rms_norm_forward",
]
