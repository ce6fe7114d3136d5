"""The analytic memory model (torchtitan_upipe.titan.memory_model) against CPU measurements.

Measured with :class:`~torchtitan_upipe.tools.memtrack.LiveTensorTracker` (peak bytes of the storages
a region allocates) at small bf16 shapes with C = 1 and the CPU kernels, so the model runs
with ``cuda_workspaces=False`` (kernel-internal GPU workspaces are invisible on CPU) and, for
RMSNorm, ``fused_rms_norm=False`` (CPU runs the composite op).  ``upipe_forward`` and
``upipe_backward`` must match to the byte (bf16 and float32, U = 1, 2, 4, 16: tau = 4, 2, 1, 1);
the other regions, which the model also reproduces to the byte or nearly, keep the brief's 25 %.
The all-to-all terms run on 4 gloo ranks (slow), where c10d can keep a send buffer alive a little
past the code's ``del``, so there the model is checked as a lower bound.
"""

from __future__ import annotations

import functools
import gc
import itertools
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import torchtitan_upipe.train_spec  # noqa: F401  (registers upipe_llama3)
from tests.helpers.paths import CONFIGS
from tests.helpers.reference import freqs_cis
from torchtitan.config import ConfigManager
from torchtitan_upipe.titan.shape import ModelShape
from torchtitan_upipe.titan import memory_model as mm
from torchtitan_upipe.cp.kernels import get_kernel
from torchtitan_upipe.tools.memtrack import LiveTensorTracker
from torchtitan_upipe.cp.upipe import UPipeSchedule
from torchtitan_upipe.cp.upipe.functional import upipe_backward, upipe_forward

DT = torch.bfloat16
H, HKV, S, D, DIM, VOCAB = 16, 4, 256, 16, 64, 512
TOL = 0.25
M = 1 << 20


def _setup(**kw) -> mm.Setup:
    sizes = {"dim": DIM, "n_layers": 4, "n_heads": H, "n_kv_heads": HKV, "head_dim": D,
             "ffn_hidden": 4 * DIM, "vocab": VOCAB}
    model = ModelShape(**{k: kw.pop(k, v) for k, v in sizes.items()})
    base = {"seq_len": S, "cp": 1, "world": 1, "cuda_workspaces": False, "fused_rms_norm": False}
    return mm.setup(model, **{**base, **kw})


def _tracker() -> LiveTensorTracker:
    gc.collect()  # no garbage whose freed address could be reused inside the region
    return LiveTensorTracker()


def _err(model: int, measured: int) -> float:
    return model / measured - 1


# ---- (a) UPipe: forward (and backward) of upipe/functional.py -----------------------------
def _weight_grads(grads) -> int:
    """Bytes of ``upipe_backward``'s wq, wk and wv gradients, made before its stages (the
    model's model_states counts these); wo's, with the fused projection, is made after the
    last stage, past the peak."""
    return sum(t.nbytes for t in grads[1:4])


@functools.cache
def _upipe_measure(u: int, dtype: torch.dtype = DT, fused_wo: bool = False) -> tuple[int, int]:
    g = torch.Generator().manual_seed(u)
    x = torch.randn(1, S, DIM, generator=g).to(dtype)
    wq, wk, wv = ((torch.randn(n * D, DIM, generator=g) * 0.1).to(dtype) for n in (H, HKV, HKV))
    wo = (torch.randn(DIM, H * D, generator=g) * 0.1).to(dtype) if fused_wo else None
    freqs, kernel, sched = freqs_cis(S, D), get_kernel("sdpa"), UPipeSchedule(H, HKV, 1, u)
    with _tracker() as fwd:
        out, lse = upipe_forward(x, wq, wk, wv, freqs, sched, None, kernel, True, D**-0.5)
    dout = torch.randn(out.shape if wo is None else x.shape, generator=g).to(dtype)
    with _tracker() as bwd:
        grads = upipe_backward(dout, x, wq, wk, wv, freqs, out, lse, sched, None, kernel, True,
                               D**-0.5, wo=wo)
    return fwd.peak_bytes, bwd.peak_bytes - _weight_grads(grads)


@pytest.mark.parametrize("fused_wo", [False, True], ids=["attention", "fused_wo"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("u", [1, 2, 4, 16])
def test_upipe_forward_phase_matches_model(u, dtype, fused_wo):
    """Forward phase: everything ``upipe_forward`` allocates (out + lse + the O(U) stage
    buffers) vs :func:`upipe_forward_bytes`; the backward is checked the same way.  Exact: in
    bf16 the backward peaks in a stage's inverse RoPE, on top of the fp32 dK/dV accumulators
    (tau > 1) or the kernel's dk_s/dv_s (tau == 1); in float32 in the kernel backward.
    ``fused_wo``: the backward makes each stage's output gradient from the block's."""
    fwd, bwd = _upipe_measure(u, dtype, fused_wo)
    e = dtype.itemsize
    st = _setup(style="upipe", chunk_heads=u, act_bytes=e, param_bytes=e, fused_wo=fused_wo)
    mf, mb = mm.upipe_forward_bytes(st), mm.upipe_backward_bytes(st)
    print(f"U={u} {dtype} tau={mm.upipe_geometry(st)['tau']}: forward measured {fwd} model {mf} "
          f"({_err(mf, fwd):+.2%}); backward measured {bwd} model {mb} ({_err(mb, bwd):+.2%})")
    assert (mf, mb) == (fwd, bwd)


def _upipe_gloo_worker(rank: int, world: int) -> None:
    """On each gloo rank: UPipe forward/backward with real all-to-alls (u = world, strided
    stage weights; tau = 4, 2, 1; KV replication rho = 2 with H_kv = 2), bf16 and float32,
    with and without the fused output projection."""
    group, kernel = torch.distributed.group.WORLD, get_kernel("sdpa")
    s = S // world
    exact = total = 0
    cases = ((HKV, world), (HKV, 2 * world), (HKV, 16), (2, world), (2, 2 * world))
    for (hkv, u), dtype, fused_wo in itertools.product(
            cases, (torch.bfloat16, torch.float32), (False, True)):
        g = torch.Generator().manual_seed(u + hkv)
        x = torch.randn(1, s, DIM, generator=g).to(dtype)
        wq, wk, wv = ((torch.randn(n * D, DIM, generator=g) * 0.1).to(dtype)
                      for n in (H, hkv, hkv))
        wo = (torch.randn(DIM, H * D, generator=g) * 0.1).to(dtype) if fused_wo else None
        freqs, sched = freqs_cis(S, D)[rank * s:(rank + 1) * s], UPipeSchedule(H, hkv, world, u)
        with _tracker() as fwd:
            out, lse = upipe_forward(x, wq, wk, wv, freqs, sched, group, kernel, True, D**-0.5)
        dout = torch.randn(out.shape if wo is None else x.shape, generator=g).to(dtype)
        with _tracker() as bwd:
            grads = upipe_backward(dout, x, wq, wk, wv, freqs, out, lse, sched, group, kernel,
                                   True, D**-0.5, wo=wo)
        measured = (fwd.peak_bytes, bwd.peak_bytes - _weight_grads(grads))
        del out, lse, dout, grads
        e = dtype.itemsize
        st = _setup(style="upipe", chunk_heads=u, n_kv_heads=hkv, cp=world, act_bytes=e,
                    param_bytes=e, fused_wo=fused_wo)
        model = (mm.upipe_forward_bytes(st), mm.upipe_backward_bytes(st))
        # c10d work objects sometimes keep send buffers alive a little longer: the
        # measurement can exceed the model, never fall below it
        case = (rank, hkv, u, dtype, fused_wo)
        assert measured[0] >= model[0] and measured[1] >= model[1], (case, measured, model)
        exact += (measured[0] == model[0]) + (measured[1] == model[1])
        if measured != model:
            print(f"rank {rank} H_kv={hkv} U={u} {dtype} wo={fused_wo}: measured {measured} "
                  f"model {model}")
        total += 2
    print(f"rank {rank}: {exact} of {total} UPipe phases match the model to the byte")


@pytest.mark.slow
def test_upipe_all_to_all_terms_bound_measurement():
    """4 gloo ranks (40-80 s on 2 cores): the model's all-to-all terms are a lower
    bound on every rank, and to the byte when no send buffer lingers (most of them)."""
    from tests.helpers.dist import run_distributed

    run_distributed(_upipe_gloo_worker, 4)


def test_upipe_measured_transient_falls_with_u():
    peaks = [_upipe_measure(u)[0] for u in (1, 4, 16)]
    assert peaks[0] < peaks[1] < peaks[2], peaks


def test_ulysses_forward_matches_model():
    """The Ulysses strategy's projections + RoPE + ulysses_attention (C = 1) under autograd."""
    from torchtitan.models.llama3.model.model import apply_rotary_emb

    from torchtitan_upipe.cp.ulysses import ulysses_attention

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, S, DIM, generator=g).to(DT).requires_grad_()
    wq, wk, wv = ((torch.randn(n * D, DIM, generator=g) * 0.1).to(DT) for n in (H, HKV, HKV))
    freqs, kernel = freqs_cis(S, D), get_kernel("sdpa")
    with _tracker() as t:
        q, k, v = (F.linear(x, w).view(1, S, -1, D) for w in (wq, wk, wv))
        q, k = apply_rotary_emb(q, k, freqs_cis=freqs)
        o = ulysses_attention(q, k, v, group=None, kernel=kernel)
    model = mm.ulysses_bytes(_setup(style="ulysses"))["fwd"]
    print(f"ulysses forward: measured {t.peak_bytes} model {model} "
          f"({_err(model, t.peak_bytes):+.1%})")
    assert abs(_err(model, t.peak_bytes)) <= TOL
    del o


# ---- (b) MLP: tiled vs untiled --------------------------------------------------------------
def _mlp_measure(tiled: bool) -> tuple[int, int]:
    from torchtitan.models.llama3.model.model import FeedForward

    from torchtitan_upipe.memory import apply_tiled_mlp

    torch.manual_seed(0)
    ff = FeedForward(DIM, 4 * DIM, 16, None).to(DT)
    if tiled:
        apply_tiled_mlp(ff, None)  # auto tiles = ceil(S / DIM), as the model assumes
    else:
        ff.requires_grad_(False)  # untiled weight grads are model_states, not activations
    x = torch.randn(1, S, DIM).to(DT).requires_grad_()
    dy = torch.randn(1, S, DIM).to(DT)
    with _tracker() as t:
        y = ff(x)
        y.backward(dy)
    return t.peak_bytes, ff.w1.weight.shape[0]


@pytest.mark.parametrize("tiled", [False, True])
def test_mlp_transient_matches_model(tiled):
    """One region = forward + backward; the test holds y through backward (``e T dim``)."""
    measured, hidden = _mlp_measure(tiled)
    st = _setup(ffn_hidden=hidden, tiled_mlp=tiled)
    r = mm.mlp_bytes(st)
    model = max(r["fwd"], r["bwd"] + st.act_bytes * st.tokens * DIM)
    print(f"mlp tiled={tiled}: measured {measured} model {model} ({_err(model, measured):+.1%})")
    assert abs(_err(model, measured)) <= TOL


def test_tiled_mlp_needs_less():
    assert _mlp_measure(True)[0] < _mlp_measure(False)[0]
    for seq in (S, 64 * S):  # the model agrees, and the gap grows with the sequence
        off = mm.mlp_bytes(_setup(seq_len=seq))
        on = mm.mlp_bytes(_setup(seq_len=seq, tiled_mlp=True))
        assert max(on.values()) < max(off.values())


# ---- norm and loss heads --------------------------------------------------------------------
@pytest.mark.parametrize("tiled", [False, True])
def test_rms_norm_matches_model(tiled):
    from torchtitan_upipe.memory import apply_tiled_rms_norm

    norm = torch.nn.RMSNorm(DIM, eps=1e-5).to(DT).requires_grad_(False)
    if tiled:
        apply_tiled_rms_norm(norm, None)
    x = torch.randn(1, S, DIM).to(DT).requires_grad_()
    dy = torch.randn(1, S, DIM).to(DT)
    with _tracker() as t:
        norm(x).backward(dy)
    r = mm.norm_bytes(_setup(tiled_norm=tiled))
    model = max(r["fwd"], r["saved"] + r["bwd"])
    print(f"rms_norm tiled={tiled}: measured {t.peak_bytes} model {model} "
          f"({_err(model, t.peak_bytes):+.1%})")
    assert abs(_err(model, t.peak_bytes)) <= TOL


@pytest.mark.parametrize("chunked", [False, True])
def test_loss_head_matches_model(chunked):
    from torchtitan.components.loss import cross_entropy_loss

    from torchtitan_upipe.memory import chunked_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(1, S, DIM).to(DT).requires_grad_()
    w = (torch.randn(VOCAB, DIM) * 0.1).to(DT).requires_grad_(chunked)
    labels = torch.randint(0, VOCAB, (1, S))
    with _tracker() as t:
        if chunked:
            loss = chunked_cross_entropy(h, w, labels, math.ceil(S / 64))
        else:
            loss = cross_entropy_loss(F.linear(h, w), labels)
        loss.backward()
    model = mm.logits_bytes(_setup(chunked_loss=chunked, loss_chunk_tokens=64))
    print(f"loss chunked={chunked}: measured {t.peak_bytes} model {model} "
          f"({_err(model, t.peak_bytes):+.1%})")
    assert abs(_err(model, t.peak_bytes)) <= TOL


# ---- (c) the model's structural claims ------------------------------------------------------
def _8b(style="upipe", seq=5 * M, on=True, chunk_heads=8) -> mm.Setup:
    st = mm.from_flavor("8B", seq_len=seq, cp=8, world=8, style=style, chunk_heads=chunk_heads)
    return mm.stack(st, on)


def test_flavor_sizes():
    st = _8b()
    assert (st.dim, st.n_layers, st.n_heads, st.n_kv_heads, st.head_dim, st.ffn_hidden,
            st.vocab) == (4096, 32, 32, 8, 128, 14336, 128256)
    assert abs(mm.param_counts(st)["total"] - 8.03e9) < 0.01e9
    # the paper's "Model" bar: 16 bytes per parameter over 8 ranks, 15.0 GiB
    assert abs(16 * mm.param_counts(st)["total"] / 8 / mm.GiB - 15.0) < 0.05
    q = mm.from_flavor("32B", seq_len=M, cp=16, ulysses=8, world=16)
    assert (q.head_dim, q.ffn_hidden, q.u, q.ring) == (128, 25600, 8, 2)


def test_upipe_transient_falls_with_u():
    for seq in (M, 5 * M):
        sts = [_8b(seq=seq, chunk_heads=u) for u in (8, 16, 32)]
        att = [mm.breakdown(st)["attention_transient"] for st in sts]
        fwd = [mm.upipe_forward_bytes(st) for st in sts]
        assert att[0] < att[1] < att[2] and fwd[0] < fwd[1] < fwd[2], (att, fwd)
    small = [mm.upipe_forward_bytes(_setup(chunk_heads=u)) for u in (1, 2, 4, 8, 16)]
    assert small == sorted(small) and len(set(small)) == 5


@pytest.mark.parametrize("seq", [M, 3 * M, 5 * M])
def test_offload_without_prefetch_holds_one_block_input_less(seq):
    """memory.offload_prefetch = false: every phase of a layer whose previous layer is
    offloaded holds one ``(b, S/C, dim)`` block input less (that layer's prefetched input);
    the loss and layers 0 and 1 (keep = 1: layer 0 is not offloaded) do not change.  The peak
    falls by at most that: it may move down to layer 1, which holds more reduced gradients."""
    for style in ("ulysses", "upipe"):
        st = _8b(style, seq)
        no = mm.replace(st, offload_prefetch=False)
        on, off = mm.breakdown(st), mm.breakdown(no)
        block_input = st.batch * st.s * st.dim * st.act_bytes
        assert 0 < on["peak_device"] - off["peak_device"] <= block_input
        for layer in range(st.n_layers):
            ph_on, ph_off = mm.phases(st, layer), mm.phases(no, layer)
            less = block_input if layer >= 2 else 0
            assert {k: ph_on[k] - ph_off[k] for k in ph_on} == {
                k: 0 if k == "loss" else less for k in ph_on}
        for k in ("checkpointed_inputs_device", "checkpointed_inputs_host"):
            assert on[k] == off[k]
    # nothing to prefetch when only the last layer is offloaded, or without offload
    st = _8b(seq=seq)
    for variant in (mm.replace(st, keep_layers=st.n_layers - 1), mm.replace(st, offload=False)):
        assert (mm.breakdown(variant)["peak_device"]
                == mm.breakdown(mm.replace(variant, offload_prefetch=False))["peak_device"])


def _small_llama(n_layers: int):
    """A small bf16 TorchTitan Llama3 (dim DIM, 4 heads, 2 KV heads, S positions), seeded."""
    import warnings

    from torchtitan_upipe.titan.llama3 import LlamaArgs, Transformer

    args = LlamaArgs(dim=DIM, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=97,
                     max_seq_len=S, multiple_of=16, rope_theta=10000)
    torch.manual_seed(0)
    model = Transformer(args)
    with warnings.catch_warnings():  # the complex freqs_cis buffer; init_weights rebuilds it
        warnings.simplefilter("ignore")
        model = model.to(DT)
    with torch.no_grad():
        model.init_weights()
    return model


def _offloaded_blocks_peak(prefetch: bool, keep: int, n_layers: int = 4,
                           refetch: bool = False, inplace: bool = False,
                           tiles: int = 0, attention_phase: bool = False,
                           upipe: int = 0, fused_wo: bool = False,
                           stride: int = 1) -> tuple[int, int]:
    """Peak live bytes of forward + backward through the blocks of a small bf16 Llama3 with
    offloaded checkpointing (parameters frozen: their grads are model states), without the
    offloader's host buffers (CPU tensors too, here: the tracker is told to skip them).  Every tensor
    alive at the start stays alive to the end, so no freed address can hide an allocation.
    The gradient arriving from above is made in the region (as the final norm's would be):
    the backward starts from ``(h * dy).sum()``.  ``tiles``: tiled MLP and norm, that many.
    ``attention_phase``: the highest peak inside an attention's backward instead (from the
    gradient of its output to that of its input), the model's ``attention_bwd``.
    ``upipe``: the plugin's UPipe attention (no CP) with that U, ``wo`` in its op with
    ``fused_wo``; ``wo`` then trains (the op makes its gradient either way, as autograd's
    ``nn.Linear`` does for a trained weight)."""
    from torchtitan_upipe.memory import HostMemory, HostOffloader, apply_offloaded_ac
    from torchtitan_upipe.titan.attention import ContextParallelAttention, UPipeStrategy
    from torchtitan_upipe.titan.groups import CPGroups
    from torchtitan_upipe.titan.memory_stack import apply_tiling

    model = _small_llama(n_layers)
    model.requires_grad_(False)
    if upipe:
        for block in model.layers.values():
            strategy = UPipeStrategy(CPGroups.local(), "sdpa", upipe, fuse_wo=fused_wo)
            block.attention = ContextParallelAttention(block.attention, strategy)
            block.attention.wo.weight.requires_grad_(True)
    if tiles:
        apply_tiling(model, SimpleNamespace(tiled_mlp=True, mlp_tiles=tiles, tiled_norm=True,
                                            norm_tiles=tiles, chunked_loss=False), S)
    making, host_buffers = [False], set()  # the buffers' data pointers

    def host_buffer(make):
        making[0] = True
        try:
            buf = make()
        finally:
            making[0] = False
        host_buffers.add(buf.data_ptr())
        return buf

    def on_host(t: torch.Tensor) -> bool:  # made, or first written (copy_), as a host buffer
        return making[0] or t.untyped_storage().data_ptr() in host_buffers

    offloader = HostOffloader(torch.device("cpu"),
                              host_memory=HostMemory(pinned=False, allocate=host_buffer))
    apply_offloaded_ac(model, offloader, keep, prefetch,
                       refetch_input=refetch, inplace_residual_grads=inplace, stride=stride)
    x = torch.randn(1, S, DIM).to(DT).requires_grad_()
    dy = torch.randn(1, S, DIM).to(DT)
    blocks, freqs = list(model.layers.values()), model.freqs_cis
    peaks = []

    def on_attention(_module, args, out):  # in the recompute: mark the attention's backward
        if out.requires_grad:
            out.register_hook(lambda _g: t.reset_peak())
            args[0].register_hook(lambda _g: peaks.append(t.peak_bytes))

    if attention_phase:
        for block in blocks:
            block.attention.register_forward_hook(on_attention)
    gc.collect()
    with LiveTensorTracker(ignore=on_host) as t:
        h = x
        for block in blocks:
            h = block(h, freqs, None, None)
        h.mul(dy).sum().backward()
        del h
    del model, blocks, freqs
    gc.collect()  # the wrapped blocks form reference cycles: leave no garbage to later tests
    if attention_phase:
        assert len(peaks) == n_layers
        return max(peaks), x.nbytes
    return t.peak_bytes, x.nbytes


@pytest.mark.parametrize("keep", [1, 3])
def test_offload_prefetch_measured(keep):
    """CPU measurement of memory.offload: without prefetch the peak is one block input
    lower when some offloaded layer has an offloaded predecessor (keep = 1 of 4 layers), and
    unchanged when none has (keep = 3); the model's io term says the same."""
    (on, block_input), (off, _) = (_offloaded_blocks_peak(p, keep) for p in (True, False))
    st = _setup(offload=True, keep_layers=keep)
    io = {p: mm.phases(mm.replace(st, offload_prefetch=p))["attention_bwd"] for p in (True, False)}
    print(f"offload keep={keep}: peak with prefetch {on}, without {off}, difference {on - off} "
          f"(block input {block_input}; model {io[True] - io[False]})")
    assert on - off == io[True] - io[False] == (block_input if keep == 1 else 0)


@pytest.mark.parametrize("keep", [0, 1, 4])
def test_offload_moves_exactly_the_offloaded_inputs(keep):
    for style in ("ulysses", "upipe"):
        st = _8b(style, seq=3 * M)
        on = mm.breakdown(mm.replace(st, offload=True, keep_layers=keep))
        off = mm.breakdown(mm.replace(st, offload=False))
        moved = (st.n_layers - keep) * st.batch * st.s * st.dim * st.act_bytes
        assert on["checkpointed_inputs_host"] == moved
        assert off["checkpointed_inputs_device"] - on["checkpointed_inputs_device"] == moved
        assert off["checkpointed_inputs_host"] == 0


def test_local_rope_table():
    """CP ranks keep only their S/C RoPE rows (models/llama3.py): ``4 s D`` instead of
    TorchTitan's ``4 S D``, and the attention takes a view instead of gathering its rows."""
    for style in ("ulysses", "upipe"):
        local, full = _8b(style, 5 * M), mm.replace(_8b(style, 5 * M), local_rope=False)
        bl, bf = mm.breakdown(local), mm.breakdown(full)
        assert bl["rope_table"] * local.cp == bf["rope_table"] == 4 * local.seq_len * local.head_dim
        rows = 4 * local.s * local.head_dim
        al, af = mm.attention_bytes(local), mm.attention_bytes(full)
        assert {k: af[k] - al[k] for k in al} == {"fwd": rows, "saved": rows, "bwd": rows}
        assert bf["peak_device"] - bl["peak_device"] == bf["rope_table"] - bl["rope_table"] + rows


def test_loss_head_with_loss_chunks_matches_model():
    """``memory.loss_chunks = n`` (n chunks, not 1K-token ones) reaches the model."""
    torch.manual_seed(0)
    h = torch.randn(1, S, DIM).to(DT).requires_grad_()
    w = (torch.randn(VOCAB, DIM) * 0.1).to(DT).requires_grad_()
    labels = torch.randint(0, VOCAB, (1, S))
    from torchtitan_upipe.memory import chunked_cross_entropy

    with _tracker() as t:
        chunked_cross_entropy(h, w, labels, 3).backward()
    model = mm.logits_bytes(_setup(chunked_loss=True, loss_chunks=3))
    assert model != mm.logits_bytes(_setup(chunked_loss=True))
    assert abs(_err(model, t.peak_bytes)) <= TOL, (model, t.peak_bytes)


def test_chunked_logits_below_untiled():
    for seq in (S, 64 * S):
        assert (mm.logits_bytes(_setup(seq_len=seq, chunked_loss=True, loss_chunk_tokens=64))
                < mm.logits_bytes(_setup(seq_len=seq)))
    assert mm.breakdown(_8b())["logits"] < mm.breakdown(_8b(on=False))["logits"]


# ---- (d) the 8B table --------------------------------------------------------------------------
def test_8b_table_is_finite_and_upipe_below_ulysses():
    for on in (True, False):
        for seq in (M, 3 * M, 5 * M):
            for style in ("ulysses", "upipe"):
                d = mm.breakdown(_8b(style, seq, on))
                assert all(isinstance(v, int) and 0 <= v < 1 << 50 for v in d.values()), d
                assert d["peak_device"] > d["model_states"] > 0
    up, ul = mm.breakdown(_8b("upipe")), mm.breakdown(_8b("ulysses"))
    print(f"8B 5M attention_transient: upipe {up['attention_transient'] / mm.GiB:.1f} GiB, "
          f"ulysses {ul['attention_transient'] / mm.GiB:.1f} GiB")
    assert up["attention_transient"] < ul["attention_transient"]
    assert up["peak_device"] < ul["peak_device"]


# ------------------------------------------------------------------ train.py's options

def test_from_job_config_is_the_configs_job():
    path = os.path.join(CONFIGS, "llama3_8b_8xh100_upipe.toml")
    job = ConfigManager().parse_args(["--job.config_file", path, "--training.seq_len", "3145728",
                                      "--memory.no-offload-prefetch"])
    st = mm.from_job_config(job, world=8)
    want = mm.replace(mm.stack(mm.from_flavor("8B", seq_len=3 << 20, cp=8, world=8, style="upipe",
                                              chunk_heads=8)), offload_prefetch=False)
    assert st == want
    assert (st.act_bytes, st.reduce_bytes) == (2, 4)
    debug = ConfigManager().parse_args(
        ["--job.config_file", os.path.join(CONFIGS, "llama3_debug_upipe_memory.toml")])
    assert mm.from_job_config(debug, world=2).loss_chunks == 3
    two = ConfigManager().parse_args(["--job.config_file", path, "--benchmark.n_layers", "2"])
    assert mm.from_job_config(two, world=8).n_layers == 2


def test_element_bytes():
    assert mm.element_bytes("float32") == 4
    assert mm.element_bytes("bfloat16") == mm.element_bytes("float16") == 2


def test_replace_changes_setup_and_job_fields():
    st = mm.from_flavor("8B", seq_len=1 << 20, cp=8, world=8, style="upipe", chunk_heads=8)
    new = mm.replace(st, seq_len=1 << 21, chunk_heads=16, n_layers=2, offload=True)
    assert (new.seq_len, new.shape.chunk_heads, new.n_layers, new.offload) == (1 << 21, 16, 2, True)
    assert new.shape.schedule.chunk_heads == 16 and st.shape.schedule.chunk_heads == 8
    assert (st.seq_len, st.n_layers, st.offload) == (1 << 20, 32, False)


# ---------------------------------------------- memory.keep_attention_output
@pytest.mark.parametrize("style", ["upipe", "ulysses"])
def test_kept_attention_results_wait_on_the_device_or_leave_it(style):
    """Real tensors, one rank, bf16: after the forward of 4 offloaded layers (keep 0) the
    device holds nothing more with keep_attention_output = "host" and exactly the model's
    L * T H (e D + 4) more with "device"; the host buffers grow by that much with "host"."""
    from torchtitan_upipe.memory import HostMemory, HostOffloader, apply_offloaded_ac
    from torchtitan_upipe.titan.attention import (ContextParallelAttention, UlyssesStrategy,
                                                  UPipeStrategy)
    from torchtitan_upipe.titan.groups import CPGroups
    from torchtitan_upipe.tools.estimate.fake_world import Counted

    def after_forward(keep):
        model = _small_llama(4)
        for block in model.layers.values():
            strategy = (UPipeStrategy(CPGroups.local(), "math", 1) if style == "upipe" else
                        UlyssesStrategy(CPGroups.local(), get_kernel("math", torch.device("cpu"))))
            block.attention = ContextParallelAttention(block.attention, strategy)
            block.attention.wo.weight.requires_grad_(True)
        counted = Counted(fake=False)
        offloader = HostOffloader(torch.device("cpu"), host_memory=HostMemory(
            pinned=False, allocate=counted.allocate_host))
        apply_offloaded_ac(model, offloader, 0, keep_attention_output=keep)
        x = torch.randn(1, S, DIM).to(DT).requires_grad_()
        blocks, freqs = list(model.layers.values()), model.freqs_cis
        with LiveTensorTracker(ignore=counted.ignore) as t:
            counted.tracker = t
            h = x
            for block in blocks:
                h = block(h, freqs, None, None)
            live = t.live_bytes
            h.backward(torch.ones_like(h))
        del model, blocks, freqs, h
        gc.collect()  # the wrapped blocks form reference cycles: leave no garbage to later tests
        return live, offloader.host_bytes()

    st = _setup(seq_len=S, n_heads=4, n_kv_heads=2, head_dim=DIM // 4, style=style)
    kept = mm.kept_attention_bytes(st)
    assert kept == S * 4 * (DIM // 4 * 2 + 4)
    (none, host_none), (dev, host_dev), (host, host_host) = (
        after_forward(k) for k in ("none", "device", "host"))
    assert dev - none == 4 * kept and host == none
    assert host_dev == host_none and host_host - host_none == 4 * kept
    for keep in ("none", "device", "host"):
        b = mm.breakdown(mm.replace(st, offload=True, keep_layers=0, keep_attention=keep))
        assert b["kept_attention_host"] == (4 * kept if keep == "host" else 0)
        assert b["host"] == b["checkpointed_inputs_host"] + b["kept_attention_host"]


def test_kept_attention_device_cost_by_layer_and_prefetch():
    """The model's terms: "device" holds the results of the layers below each backward (and
    all L in the loss); "host" holds one prefetched result where an offloaded layer
    prefetches (from layer 1 on: layer 0's result is on the host too, though its input is
    not), none without prefetch; UPipe's recompute replays (no stage transient)."""
    for style in ("upipe", "ulysses"):
        st = _8b(style, seq=M)
        kept = mm.kept_attention_bytes(st)
        assert kept == st.tokens * 32 * (128 * 2 + 4)
        none = {k: mm.phases(st, k) for k in (0, 1, 5)}
        for layer, base in none.items():
            dev = mm.phases(mm.replace(st, keep_attention="device"), layer)
            host = mm.phases(mm.replace(st, keep_attention="host"), layer)
            lean = mm.phases(mm.replace(st, keep_attention="host", offload_prefetch=False), layer)
            nopre = mm.phases(mm.replace(st, offload_prefetch=False), layer)
            assert dev["attention_bwd"] - base["attention_bwd"] == layer * kept
            assert host["attention_bwd"] - base["attention_bwd"] == (kept if layer >= 1 else 0)
            assert lean["attention_bwd"] == nopre["attention_bwd"]
            assert dev["loss"] - base["loss"] == st.n_layers * kept
            assert host["loss"] == base["loss"]
            fwd = mm.attention_bytes(mm.replace(st, keep_attention="host"))["fwd"]
            if style == "upipe":  # the replayed op: its result, no stage
                assert fwd == kept < mm.attention_bytes(st)["fwd"]
            else:  # everything but the kernel still runs
                assert fwd == mm.attention_bytes(st)["fwd"]


@pytest.mark.parametrize("flavor,cp,ulysses", [("8B", 8, 0), ("32B", 16, 8)])
def test_optimizer_state_on_the_host_moves_adam_state_off_the_peak(flavor, cp, ulysses):
    """memory.offload_optimizer_state: Adam's m and v, 8 bytes per parameter of this rank's
    shards, leave every forward/backward phase and the loss, and the host holds them."""
    st = mm.stack(mm.from_flavor(flavor, seq_len=1 << 21, cp=cp, world=cp, style="upipe",
                                 ulysses=ulysses))
    on = mm.replace(st, offload_optimizer=True)
    state = 8 * mm.param_counts(st)["total"] // cp
    assert mm.optimizer_state_bytes(st) == state
    assert state / mm.GiB > (7.4 if flavor == "8B" else 15.0)
    for layer, phase in [(None, "loss"), (0, "attention_bwd"), (5, "mlp_fwd")]:
        assert (mm.model_states_bytes(st, layer, phase) - mm.model_states_bytes(on, layer, phase)
                in (state, state + 1))  # 12 P // N against 4 P // N + 8 P // N
    a, b = mm.breakdown(st), mm.breakdown(on)
    assert b["optimizer_state_host"] == state and a["optimizer_state_host"] == 0
    assert b["host"] - a["host"] == state
    assert a["peak_device"] - b["peak_device"] in (state, state + 1)


@pytest.mark.parametrize("keep", [0, 1])
def test_refetched_input_is_one_block_input_less_in_the_backward(keep):
    """memory.offload_refetch_input, measured on real bf16 tensors through 4 offloaded Llama3
    blocks: the peak is exactly one block input lower, as the model's backward phases say."""
    (off, block_input), (on, _) = (_offloaded_blocks_peak(True, keep, refetch=r)
                                   for r in (False, True))
    st = _setup(offload=True, keep_layers=keep)

    def blocks_peak(refetch):  # the highest phase of any layer (the loss is not run here)
        s = mm.replace(st, refetch_input=refetch)
        return max(v for k in range(4) for name, v in mm.phases(s, k).items() if name != "loss")

    model = {r: blocks_peak(r) for r in (False, True)}
    print(f"refetch keep={keep}: peak {off} -> {on} (block input {block_input}; model "
          f"{model[False] - model[True]})")
    assert off - on == block_input == model[False] - model[True]


@pytest.mark.parametrize("refetch", [False, True])
def test_inplace_residual_grads_are_one_gradient_less_in_the_backward(refetch):
    """memory.offload_inplace_residual_grads, measured on real bf16 tensors through 4 offloaded
    Llama3 blocks with tiled MLP and norms (every layer offloaded, with and without refetched
    inputs): inside the attention's backward, where a layer peaks at long contexts, the peak
    is exactly one block-sized gradient lower, as the model's ``attention_bwd`` says (at
    these small shapes the MLP's backward binds the whole step, which it does not change)."""
    (off, block_input), (on, _) = (
        _offloaded_blocks_peak(True, 0, refetch=refetch, inplace=i, tiles=4, attention_phase=True)
        for i in (False, True))
    st = _setup(offload=True, keep_layers=0, refetch_input=refetch, tiled_mlp=True, mlp_tiles=4,
                tiled_norm=True, norm_tiles=4)
    model = {i: mm.phases(mm.replace(st, inplace_grads=i), 0)["attention_bwd"]
             for i in (False, True)}
    print(f"inplace refetch={refetch}: peak {off} -> {on} (block input {block_input}; model "
          f"{model[False] - model[True]})")
    assert off - on == block_input == model[False] - model[True]


@pytest.mark.parametrize("inplace", [False, True], ids=["autograd_sums", "inplace_sums"])
def test_fused_output_projection_is_one_output_gradient_less_in_the_backward(inplace):
    """memory.fuse_output_projection, measured on real bf16 tensors through 4 offloaded Llama3
    blocks with UPipe attention (U = 2 of 4 heads, tiled MLP and norms): inside the
    attention's backward the peak is exactly ``wo``'s input gradient ``e T H D`` lower (here
    ``H D = dim``: one block-sized tensor), as the model's ``attention_bwd`` says."""
    (off, block_input), (on, _) = (
        _offloaded_blocks_peak(True, 0, inplace=inplace, tiles=4, attention_phase=True,
                               upipe=2, fused_wo=f)
        for f in (False, True))
    st = _setup(n_heads=4, n_kv_heads=2, head_dim=DIM // 4, style="upipe", chunk_heads=2,
                offload=True, keep_layers=0, inplace_grads=inplace, tiled_mlp=True,
                mlp_tiles=4, tiled_norm=True, norm_tiles=4)
    model = {f: mm.phases(mm.replace(st, fused_wo=f), 0)["attention_bwd"] for f in (False, True)}
    print(f"fused wo inplace={inplace}: peak {off} -> {on} (block input {block_input}; model "
          f"{model[False] - model[True]})")
    assert off - on == block_input == model[False] - model[True]


@pytest.mark.parametrize("refetch", [False, True])
def test_segments_hold_no_more_on_the_device(refetch):
    """memory.offload_stride = 2 and 4 on real bf16 tensors through 4 offloaded Llama3 blocks
    (tiled MLP and norms, in-place residual gradients): the regenerating forwards run
    inside a layer's backward, yet without prefetch the step's peak, and the attention
    backward's, are those of offloading every input; with prefetch they are no higher (a
    regenerated input is not prefetched: there is none on the host to fetch).  The host
    holds fewer inputs: the segment tests in tests/memory/test_offload.py count them."""
    kw = dict(refetch=refetch, inplace=True, tiles=4)
    for prefetch in (False, True):
        for phase in (False, True):
            base, _ = _offloaded_blocks_peak(prefetch, 0, attention_phase=phase, **kw)
            for stride in (2, 4):
                got, _ = _offloaded_blocks_peak(prefetch, 0, attention_phase=phase,
                                                stride=stride, **kw)
                case = (prefetch, phase, stride, got, base)
                assert got <= base if prefetch else got == base, case
