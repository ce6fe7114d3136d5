"""torchtitan-upipe: UPipe and Ulysses context parallelism for TorchTitan 0.2.2.

Public attention functions (usable outside the trainer):

* :func:`ulysses_attention` -- ``q (B, S/C, H, D)``, ``k/v (B, S/C, H_kv, D)`` -> ``(B, S/C, H, D)``
* :func:`upipe_attention` -- fused projection + RoPE + headwise-chunked attention,
  ``x (B, S/C, dim)`` and canonical ``wq/wk/wv`` -> ``(B, S/C, H*D)``

The trainer integration (config section, train spec, parallelize hook) lives in
:mod:`torchtitan_upipe.train_spec`, imported by ``train.py``.
"""

from .ulysses import ulysses_attention
from .upipe import upipe_attention

__all__ = ["ulysses_attention", "upipe_attention"]
__version__ = "0.1.0"
