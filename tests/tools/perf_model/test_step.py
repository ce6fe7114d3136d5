"""The step-time model (torchtitan_upipe.tools.perf_model.step): FLOP counts by hand on a tiny
config, TorchTitan's own FLOPs per token, what a kept attention result removes, the
calibration and the modeled table's script."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers.paths import ROOT
from torchtitan_upipe.titan import memory_model as mm
from torchtitan_upipe.titan.shape import ModelShape
from torchtitan_upipe.tools.perf_model import step

# H = 4, H_kv = 2, D = 8, dim = 32, F = 64, V = 100, L = 3; S = 64 over C = 2: T = 32
TINY = ModelShape(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, ffn_hidden=64,
                  vocab=100)


def _tiny(style="ulysses", **kw) -> mm.Setup:
    return mm.setup(TINY, 64, style=style, cp=2, world=2,
                    chunk_heads=2 if style == "upipe" else 0, **kw)


def test_gemm_flops_by_hand():
    T, L = 32, 3
    qkv, o, mlp = 2 * 32 * 8 * (4 + 4), 2 * 32 * 32, 6 * 32 * 64  # 4096, 2048, 12288
    out = 6 * 100 * 32
    assert step.gemm_flops(_tiny()) == {"projections": T * L * 4 * (qkv + o),
                                        "mlp": T * L * 4 * mlp, "output": T * out}
    # UPipe's backward projects Q, K, V again; with a kept result its recompute does not
    up = step.gemm_flops(_tiny("upipe"))
    assert up["projections"] == T * L * (5 * qkv + 4 * o)
    kept = step.gemm_flops(_tiny("upipe", keep_attention="host"))
    assert kept["projections"] == T * L * (4 * qkv + 4 * o)
    assert step.gemm_flops(_tiny(keep_attention="device")) == step.gemm_flops(_tiny())
    # the tiled MLP recomputes its two up-projections, the chunked loss its logits
    lean = step.gemm_flops(_tiny(tiled_mlp=True, chunked_loss=True))
    assert lean["mlp"] == T * L * (4 * mlp + 4 * 32 * 64)
    assert lean["output"] == T * 8 * 100 * 32


def test_attention_flops_by_hand_and_what_a_kept_result_removes():
    one = 2 * 32 * 64 * 4 * 8 * 3  # 2 T S H D L: a causal forward of every layer
    for style in ("ulysses", "upipe"):
        assert step.attention_flops(_tiny(style)) == {"forward": 2 * one, "backward": 2.5 * one}
        assert step.attention_flops(_tiny(style, keep_attention="host")) == {
            "forward": one, "backward": 2.5 * one}
        assert step.kernel_forward_passes(_tiny(style)) == 2
        assert step.kernel_forward_passes(_tiny(style, keep_attention="device")) == 1


def test_model_flops_per_token_is_torchtitans_when_non_causal():
    """``causal=False`` is TorchTitan's get_dense_model_nparams_and_flops on the real model
    (6 x non-embedding parameters + 12 L H D S); the default halves the attention term."""
    import torch

    from torchtitan_upipe.titan.llama3 import LlamaArgs, Transformer

    args = LlamaArgs(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=100,
                     max_seq_len=64, multiple_of=16, rope_theta=10000)
    with torch.device("meta"):
        model = Transformer(args)
    _, theirs = args.get_nparams_and_flops(model, 64)
    shape = ModelShape.from_args(args)
    assert step.model_flops_per_token(shape, 64, causal=False) == theirs
    attention = 6 * 3 * 4 * shape.head_dim * 64
    assert step.model_flops_per_token(shape, 64) == theirs - attention


def test_the_kept_result_removes_upipes_and_the_rings_recompute_traffic():
    up, up_kept = (step.step_time(mm.stack(mm.from_flavor(
        "8B", seq_len=1 << 20, cp=8, world=8, style="upipe", chunk_heads=8, **kw)),
        step.RATES["h100"]) for kw in ({}, {"keep_attention": "host"}))
    assert up_kept.comm["a2a_bytes"] == pytest.approx(up.comm["a2a_bytes"] * 3 / 4)  # 8 -> 6
    ul, ul_kept = (step.step_time(mm.stack(mm.from_flavor(
        "8B", seq_len=1 << 20, cp=8, world=8, style="usp", ulysses=2, **kw)),
        step.RATES["h100"]) for kw in ({}, {"keep_attention": "device"}))
    assert ul_kept.comm["a2a_bytes"] == ul.comm["a2a_bytes"]  # Ulysses still sends q, k|v, o
    # per layer, ring 4: R - 1 = 3 sends per forward pass, the recompute's pass is gone
    assert ul_kept.comm["ring_count"] == ul.comm["ring_count"] - 32 * 3
    assert ul_kept.merge_s < ul.merge_s
    for base, kept in ((up, up_kept), (ul, ul_kept)):
        assert kept.attention_fwd_s == pytest.approx(base.attention_fwd_s / 2)
        assert kept.tps > base.tps and 0 < base.mfu < kept.mfu < 1


def test_host_copies_are_exposed_only_beyond_a_layers_compute():
    st = mm.stack(mm.from_flavor("8B", seq_len=1 << 20, cp=8, world=8, style="upipe",
                                 chunk_heads=8))
    rates = step.RATES["h100"]
    assert step.offload_seconds(st, rates, layer_compute_s=10.0) == 0.0  # hidden
    slow = step.offload_seconds(st, rates, layer_compute_s=0.0)  # nothing to hide behind
    x = step.offload_bytes(st) / (rates.pinned_GBps * 1e9)
    assert slow == pytest.approx(2 * 31 * x)
    assert step.offload_seconds(mm.replace(st, offload_prefetch=False), rates, 10.0) == (
        pytest.approx(31 * x))  # the backward waits for each input
    host = mm.replace(st, keep_attention="host")
    kept = mm.kept_attention_bytes(st) / (rates.pinned_GBps * 1e9)
    assert step.offload_seconds(host, rates, 0.0) == pytest.approx(2 * (31 * (x + kept) + kept))
    assert step.offload_seconds(st, rates, 0.0, pinned=False) > slow


def test_calibration_scale_and_error():
    cal = step.calibrate([(100.0, 110.0), (200.0, 200.0), (50.0, 60.0)])
    assert cal.scale == pytest.approx(1.1) and cal.n == 3
    assert cal.max_error == pytest.approx(abs(1.1 * 200 / 200 - 1))
    with pytest.raises(ValueError, match="no measurements"):
        step.calibrate([])


def test_the_modeled_table_is_labelled_and_next_to_the_paper(tmp_path):
    png = tmp_path / "step.png"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "step_model_table.py"),
                           "--png", str(png)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Not measured." in out and "| 8B on 8 | UPipe | 1M | 473 |" in out
    assert "| 32B on 16 | UPipe | 4M |" in out and "Calibrated on the paper" in out
    assert png.stat().st_size > 10_000
