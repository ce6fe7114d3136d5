"""Full-depth figures from few-layer runs: time and memory are affine in the layer count.

A training step at fixed sequence length costs ``t(L) = L * per_layer + rest`` (embedding,
loss, optimizer and the non-layer FSDP traffic are the ``rest``); likewise the peak memory
``m(L) = L * per_layer + rest`` under full activation checkpointing, where each extra layer
adds its sharded model state and its checkpointed input.  Two depths determine the line;
a third (or a full-depth run at a short length) measures the fit's error.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AffineFit:
    per_layer: float
    rest: float

    def __call__(self, n_layers: int) -> float:
        return self.per_layer * n_layers + self.rest

    def relative_error(self, n_layers: int, measured: float) -> float:
        return (self(n_layers) - measured) / measured


def fit_two(l1: int, v1: float, l2: int, v2: float) -> AffineFit:
    if l1 == l2:
        raise ValueError("need two different layer counts")
    per = (v2 - v1) / (l2 - l1)
    return AffineFit(per, v1 - per * l1)


def extrapolated_tps(seq_len: int, cp_degree: int, step_s: float) -> float:
    """TorchTitan's tokens/s per GPU for a step of ``step_s`` seconds (batch 1)."""
    return seq_len / (step_s * cp_degree)
