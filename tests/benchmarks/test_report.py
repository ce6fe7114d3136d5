"""The benchmark tooling: communication model, layer fits, report, plots, and one CPU sweep."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from tests.helpers.dist import run_distributed
from torchtitan_upipe.cp import comm
from torchtitan_upipe.tools.perf_model import comm as cm
from benchmarks import report, runner
from torchtitan_upipe.tools.perf_model.fit import AffineFit, extrapolated_tps, fit_two
from torchtitan_upipe.cp.kernels import get_kernel
from torchtitan_upipe.cp.ring import RingComm, ring_backward, ring_forward
from torchtitan_upipe.cp.ulysses import ulysses_attention
from torchtitan_upipe.cp.upipe import UPipeSchedule
from torchtitan_upipe.cp.upipe.functional import upipe_backward, upipe_forward

from tests.helpers.paths import ROOT
M = 2**20
CONFIG_8B = "train_configs/llama3_8b_8xh100_upipe.toml"


def _shape(h=4, hkv=2, d=2, dim=8, params=0, layers=1):
    return cm.ModelShape(n_heads=h, n_kv_heads=hkv, head_dim=d, dim=dim, layer_params=params,
                         n_layers=layers)


def _bytes(transfers, phase=None, category=None):
    return cm.totals(transfers, category, phase)["bytes"]


def _count(transfers, phase=None, category=None):
    return cm.totals(transfers, category, phase)["count"]


# ------------------------------------------------------------------------- comm model: by hand
def test_ulysses_volumes_by_hand():
    # H=4, H_kv=2, D=2, B=1, S=8, C=2, bf16: s = 4 local tokens
    # q: 4*4*2*2 = 64 B local, sent 64/2 = 32; k|v: 4*(2*2)*2*2 = 64 -> 32; o 32
    t = cm.ulysses_layer(_shape(), cm.Job("ulysses", 8, 2))
    assert _bytes(t, "forward") == 96 and _count(t, "forward") == 3
    assert _bytes(t, "recompute") == 96 and _count(t, "recompute") == 3
    assert _bytes(t, "backward") == 96 and _count(t, "backward") == 3  # do, dq, dk|dv
    assert _bytes(t) == 288


def test_upipe_volumes_by_hand():
    # U=2, C=2: m=1, g=2, gamma=1, kappa=1, tau=2 -> 2 stages, 1 KV chunk of 2 heads
    job = cm.Job("upipe", 8, 2, chunk_heads=2)
    sched = cm.upipe_schedule(_shape(), job)
    assert (sched.n_stages, sched.n_chunks, sched.chunk_kv_heads) == (2, 1, 2)
    t = cm.upipe_layer(_shape(), job)
    # forward: k|v 4*(2*2)*2*2/2 = 32; per stage q 4*2*2*2/2 = 16 (x2), o 16 (x2)
    assert _bytes(t, "forward") == 96 and _count(t, "forward") == 1 + 2 * 2
    # backward: k|v 32 + q 32 + o|do 64 + dq 32 + dk|dv 32
    assert _bytes(t, "backward") == 192 and _count(t, "backward") == 2 * 1 + 3 * 2


def test_ring_volumes_by_hand():
    # zigzag ring of R=2 (usp, u=1): K|V block = 1 * 8/2 tokens * 2 * 2 heads * 2 * 2 B = 64
    t = cm.cp_layer(_shape(), cm.Job("usp", 8, 2, ulysses_degree=1))
    assert _bytes(t, "forward", "a2a") == 0
    assert _bytes(t, "forward") == 64 and _count(t, "forward") == 1
    assert _bytes(t, "recompute") == 64
    # backward: R-1 = 1 K|V send + R = 2 fp32 dK|dV sends of 128 B
    assert _bytes(t, "backward") == 64 + 2 * 128 and _count(t, "backward") == 1 + 2
    # TorchTitan's ring: same bytes, the forward K|V as one all-gather
    builtin = cm.cp_layer(_shape(), cm.Job("ring", 8, 2))
    assert _bytes(builtin) == _bytes(t)
    assert {x.kind for x in builtin if x.phase == "forward"} == {"all-gather"}
    a2a_rot = cm.cp_layer(_shape(), cm.Job("ring", 8, 2, rotate_method="alltoall"))
    assert _bytes(a2a_rot) == _bytes(t) and _count(a2a_rot) == _count(t)


def test_fsdp_volumes_by_hand():
    job = cm.Job("ulysses", 16, 8, ngpu=8)
    t = cm.fsdp_layer(_shape(params=1000), job)
    # two bf16 all-gathers (FSDP2 reuses the pre-backward unshard for the recompute)
    assert _bytes(t, category="fsdp") == 2 * 2000 * 7 / 8 + 4000 * 7 / 8
    assert _count(t) == 3
    three = cm.fsdp_layer(_shape(params=1000), cm.Job("ulysses", 16, 8, ngpu=8, fsdp_all_gathers=3))
    assert _bytes(three) == 3 * 2000 * 7 / 8 + 4000 * 7 / 8


# ---------------------------------------------------------------------- comm model: properties
CASES = [(32, 8, 8, 8), (32, 8, 8, 16), (32, 8, 8, 32), (16, 4, 4, 4), (8, 2, 4, 4), (64, 8, 8, 8)]


@pytest.mark.parametrize("h,hkv,c,u", CASES)
def test_upipe_forward_volume_equals_ulysses(h, hkv, c, u):
    shape = _shape(h, hkv, 128, 4096)
    uly = cm.ulysses_layer(shape, cm.Job("ulysses", 1024 * c, c))
    up = cm.upipe_layer(shape, cm.Job("upipe", 1024 * c, c, chunk_heads=u))
    sched = UPipeSchedule(h, hkv, c, u)
    # K/V go once per chunk, so the forward moves exactly Ulysses' bytes ...
    assert _bytes(up, "forward") == pytest.approx(_bytes(uly, "forward"))
    # ... in n_chunks + 2 n_stages collectives instead of 3
    assert _count(up, "forward") == sched.n_chunks + 2 * sched.n_stages
    assert _count(up, "backward") == 2 * sched.n_chunks + 3 * sched.n_stages
    # full AC: UPipe re-sends K|V and O in the backward, 8 (H + H_kv') vs 6 (H + H_kv')
    assert _bytes(up) == pytest.approx(_bytes(uly) * 8 / 6)


def test_llama3_8b_shape_and_counts():
    from torchtitan_upipe.titan.llama3 import FLAVORS

    shape = cm.ModelShape.from_args(FLAVORS["8B"])
    assert (shape.n_heads, shape.n_kv_heads, shape.head_dim) == (32, 8, 128)
    assert shape.layer_params == 4096 * (32 + 16) * 128 + 32 * 128 * 4096 + 3 * 4096 * 14336 + 2 * 4096
    t = cm.upipe_layer(shape, cm.Job("upipe", 128 * 1024, 8, chunk_heads=8))
    assert _count(t, "forward") == 1 + 2 * 4  # 1 KV chunk (H_kv = C), 4 stages of 8 heads


def test_step_seconds_links_and_tps():
    net = cm.Network(nvlink_GBps=100.0, ib_GBps=10.0, efficiency=0.5, latency_us=10.0)
    shape = _shape(32, 8, 128, 4096, params=10**8, layers=4)
    job = cm.Job("ulysses", 2**16, 8, ngpu=8)
    br = cm.step_comm_seconds(shape, job, net)
    tr = cm.step_transfers(shape, job)
    a2a = [t for t in tr if t.category == "a2a"]
    expect = sum(t.bytes for t in a2a) / 50e9 + sum(t.count for t in a2a) * 10e-6
    assert br["a2a_s"] == pytest.approx(expect)
    assert br["comm_s"] == pytest.approx(br["a2a_s"] + br["ring_s"] + br["fsdp_s"])
    assert br["count"] == 4 * (9 + 3) + 5  # + embedding (2 AG, 1 RS) and norm+output (1 AG, 1 RS)
    # usp over 16 GPUs: the ring group (ranks 8 apart) crosses nodes -> InfiniBand
    usp = cm.Job("usp", 2**16, 16, ngpu=16, ulysses_degree=8)
    ring = [t for t in cm.step_transfers(shape, usp) if t.category == "ring"]
    assert all(cm.spans_nodes(t.group_size, t.group_stride, 8) for t in ring)
    assert cm.step_comm_seconds(shape, usp, net)["ring_s"] == pytest.approx(
        sum(t.bytes for t in ring) / 5e9 + sum(t.count for t in ring) * 10e-6)
    # tokens/s per GPU = S / (C (compute + exposed comm)); overlap hides the ring only
    assert cm.modeled_tps(2**16, 8, 1.0, 0.25) == pytest.approx(2**16 / (8 * 1.25))
    br = {"a2a_s": 0.1, "ring_s": 0.3, "fsdp_s": 0.2, "comm_s": 0.6}
    assert cm.modeled_tps(1000, 2, 1.0, br) == pytest.approx(1000 / (2 * 1.6))
    assert cm.modeled_tps(1000, 2, 1.0, br, overlap=True) == pytest.approx(1000 / (2 * 1.3))
    assert cm.modeled_tps(1000, 2, 0.2, br, overlap=("ring", "fsdp")) == pytest.approx(1000 / (2 * 0.6))
    step = cm.model_step(shape, job, 2.0, net)
    assert step["total_s"] == pytest.approx(2.0 + step["comm_s"])


# ------------------------------------------------------- comm model against the code's traffic
S_LOCAL, HD, DIM = 4, 4, 8


def _traffic(rank, c):
    """Count the bytes the real ops put on the wire and compare with the model (float64)."""
    g = torch.Generator().manual_seed(rank)
    kernel = get_kernel("math")
    sent = []
    orig_a2a, orig_p2p = comm._all_to_all, RingComm.send_recv

    def a2a(buf, group):
        sent.append(buf.numel() * buf.element_size() * (c - 1) / c)
        return orig_a2a(buf, group)

    def p2p(self, to_send, recv_buf=None):
        sent.append(to_send.numel() * to_send.element_size())
        return orig_p2p(self, to_send, recv_buf)

    comm._all_to_all, RingComm.send_recv = a2a, p2p
    try:
        group = dist.group.WORLD
        for h, hkv, u in [(4, 2, 2), (8, 2, 2), (8, 4, 4)]:
            shape = _shape(h, hkv, HD, DIM)
            x = torch.randn(1, S_LOCAL, DIM, generator=g, dtype=torch.float64)
            wq, wk, wv = (torch.randn(n * HD, DIM, generator=g, dtype=torch.float64) for n in (h, hkv, hkv))
            freqs = torch.polar(torch.ones(S_LOCAL, HD // 2, dtype=torch.float64),
                                torch.rand(S_LOCAL, HD // 2, generator=g, dtype=torch.float64))
            model = cm.upipe_layer(shape, cm.Job("upipe", S_LOCAL * c, c, chunk_heads=u, act_bytes=8))
            sched = UPipeSchedule(h, hkv, c, u)
            sent.clear()
            out, lse = upipe_forward(x, wq, wk, wv, freqs, sched, group, kernel, True, 0.5)
            assert (sum(sent), len(sent)) == (_bytes(model, "forward"), _count(model, "forward"))
            sent.clear()
            upipe_backward(torch.randn_like(out), x, wq, wk, wv, freqs, out, lse, sched, group, kernel, True, 0.5)
            assert (sum(sent), len(sent)) == (_bytes(model, "backward"), _count(model, "backward"))

            model = cm.ulysses_layer(shape, cm.Job("ulysses", S_LOCAL * c, c, act_bytes=8))
            q = torch.randn(1, S_LOCAL, h, HD, dtype=torch.float64, generator=g, requires_grad=True)
            k, v = (torch.randn(1, S_LOCAL, hkv, HD, dtype=torch.float64, generator=g, requires_grad=True)
                    for _ in range(2))
            sent.clear()
            o = ulysses_attention(q, k, v, group=group, kernel=kernel)
            assert (sum(sent), len(sent)) == (_bytes(model, "forward"), _count(model, "forward"))
            sent.clear()
            o.backward(torch.randn_like(o))
            assert (sum(sent), len(sent)) == (_bytes(model, "backward"), _count(model, "backward"))

            # zigzag ring over all c ranks (usp with u = 1); one forward and one backward pass
            model = cm.cp_layer(shape, cm.Job("usp", S_LOCAL * c, c, ulysses_degree=1,
                                              act_bytes=8, acc_bytes=8))
            q, k, v = (t.detach() for t in (q, k, v))
            sent.clear()
            out, lse = ring_forward(group, q, k, v, kernel, True, 0.5)
            assert (sum(sent), len(sent)) == (_bytes(model, "forward"), _count(model, "forward"))
            sent.clear()
            ring_backward(group, torch.randn_like(out), q, k, v, out, lse, kernel, True, 0.5)
            assert (sum(sent), len(sent)) == (_bytes(model, "backward"), _count(model, "backward"))
    finally:
        comm._all_to_all, RingComm.send_recv = orig_a2a, orig_p2p


def test_model_matches_the_bytes_the_ops_send():
    run_distributed(_traffic, 2)


# ---------------------------------------------------------------------------------------- fit
def test_fit_is_exact_on_affine_data():
    f = fit_two(1, 10.5, 2, 12.0)
    assert f == AffineFit(1.5, 9.0)
    assert f(32) == pytest.approx(57.0)
    assert f.relative_error(32, 57.0) == pytest.approx(0.0)
    assert f.relative_error(32, 50.0) == pytest.approx(7 / 50)
    assert extrapolated_tps(131072, 8, 2.0) == pytest.approx(8192.0)
    with pytest.raises(ValueError):
        fit_two(2, 1.0, 2, 3.0)


# ------------------------------------------------------------------------------ synthetic JSON
def _mem(style, layers, seq):
    """Affine in layers: full depth (32) = 26 + a * S/M GiB, a = 12.25 (upipe) or 15 (ulysses)."""
    a = 12.25 if style == "upipe" else 15.0
    return 10.0 + 0.5 * layers + a * seq / M


def _step(layers, seq):
    return 0.5 + 0.2 * layers * (seq / (128 * 1024)) ** 2


def _synthetic(path, full_err=0.1):
    results = []
    styles = [{"style": "upipe", "chunk_heads": 8},
              {"style": "ulysses", "chunk_heads": 0, "ulysses_degree": 0}]
    for st in styles:
        for seq in report.PAPER_GRID[:8]:
            for layers in (1, 2):
                spec = runner.RunSpec(CONFIG_8B, 8, seq, layers, steps=3, warmup=1, **st)
                if st["style"] == "ulysses" and seq >= 4 * M:
                    results.append(runner.RunResult(spec, "cmd", ok=False, oom=True, error="OutOfMemoryError"))
                    continue
                results.append(runner.RunResult(
                    spec, "cmd", ok=True, oom=False, reserved_gib=_mem(st["style"], layers, seq),
                    active_gib=_mem(st["style"], layers, seq) - 1, step_s=_step(layers, seq),
                    tps=seq / (8 * _step(layers, seq))))
        # one full-depth run at 128K, 10 % above the fit (time) and exactly on it (memory)
        spec = runner.RunSpec(CONFIG_8B, 8, 128 * 1024, 0, steps=3, warmup=1, **st)
        results.append(runner.RunResult(
            spec, "cmd", ok=True, oom=False, reserved_gib=_mem(st["style"], 32, 128 * 1024),
            active_gib=1.0, step_s=_step(32, 128 * 1024) * (1 + full_err), tps=1.0))
    runner.save(results, str(path), ["python", "scripts/bench_one_rank.py", "--synthetic"])
    return path


@pytest.fixture(scope="module")
def synthetic_json(tmp_path_factory):
    return _synthetic(tmp_path_factory.mktemp("bench") / "synthetic.json")


def test_report_full_depth_and_fit_error(synthetic_json):
    points = report.analyze(report.load([str(synthetic_json)]))
    by = {(p.label, p.seq_len): p for p in points}
    p = by[("upipe(U=8)", 2 * M)]
    assert p.setting.full_layers == 32 and p.setting.cp_degree == 8
    assert p.mem_source == "fit L=1,2" and p.mem_gib == pytest.approx(_mem("upipe", 32, 2 * M))
    assert p.step_s == pytest.approx(_step(32, 2 * M))
    assert p.compute_tps == pytest.approx(2 * M / (8 * p.step_s))
    assert p.model["tps"] < p.compute_tps and p.model["comm_s"] > 0
    full = by[("upipe(U=8)", 128 * 1024)]
    assert full.mem_source == "measured" and full.mem_fit_err == pytest.approx(0.0)
    assert full.step_fit_err == pytest.approx(1 / 1.1 - 1)
    assert by[("ulysses", 4 * M)].oom and by[("ulysses", 4 * M)].mem_gib is None


def test_max_context_uses_the_reserve(synthetic_json):
    points = report.analyze(report.load([str(synthetic_json)]))
    mc = {m.label: m for m in report.max_context(points, device_gib=80, reserve_gib=4)}
    # upipe full depth: 4M -> 75 GiB (+4 fits in 80), 5M -> 87.25 GiB
    assert (mc["upipe(U=8)"].max_len, mc["upipe(U=8)"].first_fail) == (4 * M, 5 * M)
    assert mc["upipe(U=8)"].paper_row == "UPipe"
    # ulysses: 3M -> 71 GiB fits; OOM at 4M
    assert (mc["ulysses"].max_len, mc["ulysses"].first_fail) == (3 * M, 4 * M)
    # a larger reserve makes 4M too big for upipe (75 + 6 > 80)
    mc = {m.label: m for m in report.max_context(points, device_gib=80, reserve_gib=6)}
    assert mc["upipe(U=8)"].max_len == 3 * M


def test_markdown_has_command_and_paper_numbers(synthetic_json, tmp_path):
    out = tmp_path / "r.md"
    report.main([str(synthetic_json), "--out", str(out)])
    text = out.read_text()
    assert "python scripts/bench_one_rank.py --synthetic" in text
    for number in ("2281.05", "2320.47", "98.25", "1373.87"):
        assert number in text
    assert "| upipe(U=8) | 4M | 5M | UPipe | 5M |" in text
    assert "| ulysses | 3M | 4M | Ulysses | 3M |" in text


def test_setting_reads_overrides():
    s = report.setting_of({
        "config": "train_configs/llama3_debug_upipe.toml", "ngpu": 4, "style": "upipe",
        "chunk_heads": None, "ulysses_degree": None,
        "extra": ["--parallelism.context_parallel_degree", "4", "--training.local_batch_size=1"],
    })
    assert (s.flavor, s.full_layers, s.cp_degree, s.chunk_heads, s.batch, s.act_bytes) == (
        "debugmodel", 6, 4, 4, 1, 4)
    ring = report.setting_of({"config": CONFIG_8B, "ngpu": 8, "style": "ring", "chunk_heads": 0,
                              "extra": ["--parallelism.context_parallel_rotate_method", "alltoall"]})
    assert (ring.rotate_method, ring.chunk_heads, ring.label, ring.paper_row()) == (
        "alltoall", 0, "ring", "Native PyTorch")
    assert report.fmt_len(5 * M) == "5M" and report.fmt_len(128 * 1024) == "128K"


def test_paper_rows_of_the_16_gpu_setups(tmp_path):
    """On 16 GPUs the paper's "Ulysses" and "UPipe" are the 8 x 2 hybrids; its 32B table and
    maximum contexts are the 32B flavor's, Fig. 5's the 8B flavor's on 16."""
    def of(config, **spec):
        return report.setting_of(dict({"config": config, "ngpu": 16}, **spec))

    c32 = "train_configs/llama3_32b_16xh100_usp.toml"
    got = {s.label: (s.paper_row(), s.paper_max_context()) for s in (
        of(c32), of(c32, style="upipe", chunk_heads=8), of(c32, style="usp", ulysses_degree=1),
        of(c32, style="ring", chunk_heads=0), of(c32, style="usp", ulysses_degree=4))}
    assert got == {"usp(u=8)": ("Ulysses", 2 * M), "upipe(U=8,u=8)": ("UPipe", 4 * M),
                   "usp(u=1)": ("Ring", 2 * M), "ring": ("Native PyTorch", 512 * 1024),
                   "usp(u=4)": (None, None)}
    # the paper's UPipe is U = 8: U = 16 is ours alone
    assert of(c32, style="upipe", chunk_heads=16).paper_row() is None
    assert report.setting_of({"config": CONFIG_8B, "ngpu": 8, "style": "upipe",
                              "chunk_heads": 16}).paper_row() is None
    c8 = "train_configs/llama3_8b_16xh100_usp.toml"
    assert (of(c8).paper_row(), of(c8).paper_max_context()) == ("Ulysses", 6 * M)
    assert of(c8, style="usp", ulysses_degree=1).paper_row() is None  # not in Fig. 5
    assert report._paper_tps(("32B", 16), "UPipe", 3 * M) == "40.42"
    assert report._paper_tps(("32B", 16), "UPipe", 5 * M) == "OOM"
    assert report._paper_tps(("8B", 16), "UPipe", 3 * M) == ""  # Fig. 5 has no throughput
    # a 32B run gets the 32B paper figures, never the 8B table's
    spec = runner.RunSpec(c32, 16, 3 * M, style="upipe", chunk_heads=8, ulysses_degree=8, rank=8)
    run = runner.RunResult(spec, "cmd", ok=True, oom=False, reserved_gib=60.0, active_gib=58.0,
                           step_s=100.0, tps=1.0)
    runner.save([run], str(tmp_path / "r.json"), ["bench"])
    text = report.markdown(report.load([str(tmp_path / "r.json")]))
    assert "| upipe(U=8,u=8) rank 8 | 3M | 64 | 60.00 |" in text and "| 40.42 |" in text
    assert "| upipe(U=8,u=8) rank 8 | >= 3M | - | UPipe | 4M |" in text
    assert "## Paper, Table 3: Qwen3-32B" in text


def test_plot_writes_pngs(synthetic_json, tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "plot_benchmarks.py"), str(synthetic_json),
         "--out-dir", str(tmp_path), "--prefix", "syn"], check=False, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    for name in ("syn_memory.png", "syn_throughput.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_bench_cli_parsing():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import bench_one_rank as b

    assert b.parse_len("128K") == 131072 and b.parse_len("5M") == 5 * M and b.parse_len("512") == 512
    assert b.parse_style("upipe:16") == {"style": "upipe", "chunk_heads": 16}
    assert b.parse_style("usp:u=8") == {"style": "usp", "chunk_heads": 0, "ulysses_degree": 8}
    assert b.parse_style("ulysses") == {"style": "ulysses", "chunk_heads": 0, "ulysses_degree": 0}
    assert b.parse_style("ring") == {"style": "ring", "chunk_heads": 0}
    assert b.parse_style("config") == {"style": None}
    assert b.parse_style("upipe:U=8,u=4") == {"style": "upipe", "chunk_heads": 8, "ulysses_degree": 4}
    assert b.parse_style("ring:r=7") == {"style": "ring", "chunk_heads": 0, "rank": 7}


def test_another_rank_is_its_own_setting():
    """``r=n``: rank n of the job (``benchmark.fake_rank``), which writes its own TensorBoard
    folder (TorchTitan's metrics are rank 0's only); a different setting from rank 0's."""
    spec = runner.RunSpec(CONFIG_8B, 8, 4 * M, style="ring", chunk_heads=0, rank=7)
    args = runner.train_args(spec, "/dump")
    i = args.index("--benchmark.fake_rank")
    assert args[i + 1] == "7" and "--metrics.save_for_all_ranks" in args
    assert "--benchmark.fake_rank" not in runner.train_args(
        runner.RunSpec(CONFIG_8B, 8, 4 * M, style="ring"), "/dump")
    assert spec.label() == "ring rank 7 S=4194304 L=all"
    as_saved = {"config": CONFIG_8B, "ngpu": 8, "style": "ring", "chunk_heads": 0}
    last, first = report.setting_of(dict(as_saved, rank=7)), report.setting_of(as_saved)
    assert (last.rank, last.label, last.options) == (7, "ring rank 7", ())
    assert first.rank == 0 and first.label == "ring" and first != last
    by_option = report.setting_of(dict(as_saved, extra=["--benchmark.fake_rank", "3"]))
    assert by_option.rank == 3 and by_option.options == ()
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "bench_one_rank.py"), "--config", CONFIG_8B,
         "--styles", "ring:r=8", "--seq-lens", "128K", "--out", "/dev/null"],
        check=False, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "rank r=8 is not a rank of the 8-rank job; valid: 0 to 7" in proc.stderr


# ------------------------------------------------------------------------------- end to end (CPU)
@pytest.mark.slow
def test_bench_one_rank_end_to_end(tmp_path):
    out = tmp_path / "cpu.json"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "bench_one_rank.py"),
           "--config", "train_configs/llama3_debug_upipe.toml", "--ngpu", "4",
           "--styles", "upipe:4", "ulysses", "--seq-lens", "256", "512", "--layers", "1", "2",
           "--steps", "3", "--warmup", "1", "--jobs", "2", "--timeout", "300", "--out", str(out),
           "--", "--parallelism.context_parallel_degree", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert "bench_one_rank.py" in data["command"]
    runs = data["runs"]
    assert len(runs) == 8 and all(r["ok"] for r in runs), [r.get("error") for r in runs]
    for r in runs:
        assert r["tps"] > 0 and r["step_s"] > 0
        assert isinstance(r["reserved_gib"], float) and isinstance(r["active_gib"], float)
    text = report.markdown(report.load([str(out)]))
    assert "| upipe(U=4) | 512 | 6 |" in text  # extrapolated to the debug model's 6 layers


@pytest.mark.slow
def test_train_py_on_the_fake_backend_is_the_chosen_rank(tmp_path):
    """``benchmark.fake_rank``: train.py really is rank 3 of the 4-rank job (TorchTitan names
    the TensorBoard folder by ``dist.get_rank()``), and the runner reads its scalars."""
    spec = runner.RunSpec("train_configs/llama3_debug_upipe.toml", 4, 512, n_layers=1, style="usp",
                          chunk_heads=0, ulysses_degree=1, steps=3, warmup=1, rank=3,
                          extra=["--parallelism.context_parallel_degree", "4"])
    env = dict(os.environ, NGPU="4", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(runner.command(spec, str(tmp_path)), env=env, check=False,
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = [os.path.basename(p) for p in (tmp_path / "tb").glob("*/*")]
    assert folders == ["rank_3"]
    got = runner.summarize(runner._scalars(str(tmp_path)), spec.warmup)
    assert got["step_s"] > 0 and got["tps"] > 0 and got["reserved_gib"] > 0


def test_runs_that_differ_in_an_option_are_different_settings(tmp_path):
    """A run with an extra train.py option (here the memory stack's prefetch off) is its own
    setting: never merged into the same style's point, its own maximum context."""
    spec = functools.partial(runner.RunSpec, CONFIG_8B, 8, style="upipe", chunk_heads=8)
    off = ["--memory.no-offload-prefetch"]
    results = [_estimate_run(spec(4 * M), 67.0), _estimate_run(spec(5 * M), 79.5),
               _estimate_run(spec(5 * M, extra=off), 74.6),
               _estimate_run(spec(6 * M, extra=off), 86.2)]
    path = tmp_path / "est.json"
    runner.save(results, str(path), ["python", "scripts/bench_one_rank.py", "--estimate"])
    points = report.analyze(report.load([str(path)]))
    by = {(p.label, p.seq_len): p.est_gib for p in points}
    assert by == {("upipe(U=8)", 4 * M): 67.0, ("upipe(U=8)", 5 * M): 79.5,
                  ("upipe(U=8) [memory.no_offload_prefetch=true]", 5 * M): 74.6,
                  ("upipe(U=8) [memory.no_offload_prefetch=true]", 6 * M): 86.2}
    est = report.max_context(points, device_gib=80, reserve_gib=4, estimated=True)
    assert sorted((m.label, m.max_len, m.first_fail) for m in est) == [
        ("upipe(U=8)", 4 * M, 5 * M),
        ("upipe(U=8) [memory.no_offload_prefetch=true]", 5 * M, 6 * M)]
    ring = report.setting_of({"config": CONFIG_8B, "ngpu": 8, "style": "ulysses",
                              "extra": ["--parallelism.context_parallel_rotate_method", "alltoall"]})
    assert ring.options == () and ring.label == "ulysses"  # resolved, not an option


def _estimate_run(spec, peak, host=0.5):
    return runner.RunResult(spec, "est-cmd", ok=True, oom=False, kind="estimate",
                            est_peak_gib=peak, est_host_gib=host)


def test_report_carries_a_short_measurement_to_full_depth_with_the_estimator(tmp_path):
    """Memory is not affine in the layer count; the estimator's difference carries it."""
    st = {"style": "upipe", "chunk_heads": 8}
    spec = functools.partial(runner.RunSpec, CONFIG_8B, 8, steps=3, warmup=1, **st)
    results = [
        runner.RunResult(spec(1 * M, 1), "cmd", ok=True, oom=False, reserved_gib=20.0,
                         active_gib=19.0, step_s=1.0, tps=1.0),
        runner.RunResult(spec(1 * M, 2), "cmd", ok=True, oom=False, reserved_gib=21.0,
                         active_gib=20.0, step_s=2.0, tps=1.0),
        _estimate_run(spec(1 * M, 1), 18.0), _estimate_run(spec(1 * M, 0), 40.0, host=7.75),
        # at 128K a full-depth measurement checks the carried value and the estimate itself
        runner.RunResult(spec(128 * 1024, 1), "cmd", ok=True, oom=False, reserved_gib=10.0,
                         active_gib=9.0, step_s=1.0, tps=1.0),
        runner.RunResult(spec(128 * 1024, 0), "cmd", ok=True, oom=False, reserved_gib=33.0,
                         active_gib=30.0, step_s=9.0, tps=1.0),
        _estimate_run(spec(128 * 1024, 1), 8.0), _estimate_run(spec(128 * 1024, 0), 30.0),
        # only estimated, no GPU run: in the estimate table, not in the measured maximum context
        _estimate_run(spec(5 * M, 0), 79.0), _estimate_run(spec(4 * M, 0), 70.0),
    ]
    path = tmp_path / "est.json"
    runner.save(results, str(path), ["python", "scripts/bench_one_rank.py", "--estimate"])
    points = report.analyze(report.load([str(path)]))
    by = {p.seq_len: p for p in points}
    p = by[1 * M]
    # the deepest measured run that has an estimate at its depth
    assert p.mem_source == "L=1 + estimate" and p.mem_gib == pytest.approx(20.0 + 40.0 - 18.0)
    assert (p.est_gib, p.est_host_gib, p.est_err) == (40.0, 7.75, None)
    q = by[128 * 1024]
    assert q.mem_source == "measured" and q.mem_gib == 33.0
    assert q.mem_fit_err == pytest.approx((10.0 + 30.0 - 8.0 - 33.0) / 33.0)
    assert q.est_err == pytest.approx(0.0)
    assert by[5 * M].mem_gib is None and by[5 * M].est_gib == 79.0
    mc = report.max_context(points, device_gib=80, reserve_gib=4)
    assert [(m.max_len, m.first_fail) for m in mc] == [(1 * M, None)]
    est = report.max_context(points, device_gib=80, reserve_gib=4, estimated=True)
    assert [(m.max_len, m.first_fail) for m in est] == [(4 * M, 5 * M)]
    text = report.markdown(report.load([str(path)]))
    assert "## CPU memory estimate" in text and "| upipe(U=8) | 5M | 32 | 79.00 |" in text
    full_depth = text[text.index("## Full depth"):text.index("## Maximum context")]
    assert "| 1M |" in full_depth and "| 5M |" not in full_depth  # 5M: estimated only
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import plot_benchmarks as plot

    assert plot.series(points)["upipe(U=8)"]["est"][-2:] == [70.0, 79.0]
    for png in plot.main([str(path), "--out-dir", str(tmp_path)]):
        assert os.path.getsize(png) > 10_000


@pytest.mark.slow
def test_bench_one_rank_estimate_mode(tmp_path):
    out = tmp_path / "est.json"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "bench_one_rank.py"), "--estimate",
           "--config", "train_configs/llama3_debug_upipe.toml", "--ngpu", "2",
           "--styles", "upipe:2", "--seq-lens", "512", "--layers", "2", "0",
           "--timeout", "300", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [r["kind"] for r in runs] == ["estimate", "estimate"] and all(r["ok"] for r in runs)
    assert "torchtitan_upipe.tools.estimate --ngpu 2" in runs[0]["command"]
    two, six = (r["est_peak_gib"] for r in runs)
    assert 0 < two < six
