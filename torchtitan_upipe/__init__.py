"""torchtitan-upipe: UPipe and Ulysses context parallelism for TorchTitan 0.2.2.

Public attention functions (usable outside the trainer):

* :func:`ulysses_attention` -- ``q (B, S/C, H, D)``, ``k/v (B, S/C, H_kv, D)`` -> ``(B, S/C, H, D)``
* :func:`upipe_attention` -- fused projection + RoPE + headwise-chunked attention,
  ``x (B, S/C, dim)`` and canonical ``wq/wk/wv`` -> ``(B, S/C, H*D)``
* :func:`ring_attention` -- zigzag ring attention, ``q (B, S_local, H, D)`` of a ring rank's
  zigzag shard -> ``(B, S_local, H, D)``

The trainer integration (config section, train spec, parallelize hook) lives in
:mod:`torchtitan_upipe.titan`; ``import torchtitan_upipe.train_spec`` registers it.
"""

from .cp.ring import ring_attention
from .cp.ulysses import ulysses_attention
from .cp.upipe import upipe_attention

__all__ = ["ring_attention", "ulysses_attention", "upipe_attention"]
__version__ = "0.1.0"
