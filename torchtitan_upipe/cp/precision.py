"""The one precision rule of every accumulator, op-math value and LSE in this package.

float64 inputs stay float64 (the exact tests compare in float64); everything else --
float32, bfloat16, float16 -- accumulates in float32.  The attention kernels' log-sum-exp,
the ring's running output, UPipe's dK/dV over a KV chunk, RoPE's complex products, and the
memory ops' weight-gradient accumulators, RMSNorm op-math and loss logits all follow it.
"""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """``float64`` for ``float64``, else ``float32``."""
    return torch.float64 if dtype == torch.float64 else torch.float32
