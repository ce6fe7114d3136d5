"""The one accumulation rule: float64 stays float64, everything else accumulates in float32."""

import torch

from torchtitan_upipe.cp.precision import accumulation_dtype


def test_float64_stays_and_the_rest_is_float32():
    assert accumulation_dtype(torch.float64) == torch.float64
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert accumulation_dtype(dtype) == torch.float32


def test_every_accumulator_follows_it():
    """The ring's running state, a kernel's LSE and UPipe's LSE use the rule."""
    from torchtitan_upipe.cp.kernels import get_kernel
    from torchtitan_upipe.cp.ring import ring_forward

    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        q = torch.randn(1, 4, 2, 8).to(dtype)
        _, lse = get_kernel("math").forward(q, q, q, causal=True, scale=0.5)
        assert lse.dtype == accumulation_dtype(dtype)
        _, lse = ring_forward(None, q, q, q, get_kernel("math"), True, 0.5)
        assert lse.dtype == accumulation_dtype(dtype)
