"""The CPU memory estimator: one rank of an N-rank job on fake tensors (see :mod:`.estimator`)."""

from .estimator import Estimate, estimate_memory, format_breakdown

__all__ = ["Estimate", "estimate_memory", "format_breakdown"]
