"""The benchmark report: full depth, fits, maximum contexts, settings and the paper's rows,
on synthetic results with known answers."""

from __future__ import annotations

import functools
import os

import pytest

from benchmarks import report, runner
from tests.helpers.bench_data import CONFIG_8B, M, mem, step, synthetic


@pytest.fixture(scope="module")
def synthetic_json(tmp_path_factory):
    return synthetic(tmp_path_factory.mktemp("bench") / "synthetic.json")


def test_report_full_depth_and_fit_error(synthetic_json):
    points = report.analyze(report.load([str(synthetic_json)]))
    by = {(p.label, p.seq_len): p for p in points}
    p = by[("upipe(U=8)", 2 * M)]
    assert p.setting.full_layers == 32 and p.setting.cp_degree == 8
    assert p.mem_source == "fit L=1,2" and p.mem_gib == pytest.approx(mem("upipe", 32, 2 * M))
    assert p.step_s == pytest.approx(step(32, 2 * M))
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
        "alltoall", 0, "ring(rotate=alltoall)", "Native PyTorch")
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
                   "usp(u=1)": ("Ring", 2 * M), "ring(rotate=allgather)": ("Native PyTorch", 512 * 1024),
                   "usp(u=4)": (None, None)}
    # the paper's UPipe is U = 8: U = 16 is ours alone
    assert of(c32, style="upipe", chunk_heads=16).paper_row() is None
    assert report.setting_of({"config": CONFIG_8B, "ngpu": 8, "style": "upipe",
                              "chunk_heads": 16}).paper_row() is None
    c8 = "train_configs/llama3_8b_16xh100_usp.toml"
    assert (of(c8).paper_row(), of(c8).paper_max_context()) == ("Ulysses", 6 * M)
    assert of(c8, style="usp", ulysses_degree=1).paper_row() is None  # not in Fig. 5
    assert report.paper_tps(("32B", 16), "UPipe", 3 * M) == "40.42"
    assert report.paper_tps(("32B", 16), "UPipe", 5 * M) == "OOM"
    assert report.paper_tps(("8B", 16), "UPipe", 3 * M) == ""  # Fig. 5 has no throughput
    # a 32B run gets the 32B paper figures, never the 8B table's
    spec = runner.RunSpec(c32, 16, 3 * M, style="upipe", chunk_heads=8, ulysses_degree=8, rank=8)
    run = runner.RunResult(spec, "cmd", ok=True, oom=False, reserved_gib=60.0, active_gib=58.0,
                           step_s=100.0, tps=1.0)
    runner.save([run], str(tmp_path / "r.json"), ["bench"])
    text = report.markdown(report.load([str(tmp_path / "r.json")]))
    assert "| upipe(U=8,u=8) rank 8 | 3M | 64 | 60.00 |" in text and "| 40.42 |" in text
    assert "| upipe(U=8,u=8) rank 8 | >= 3M | - | UPipe | 4M |" in text
    assert "## Paper, Table 3: Qwen3-32B" in text


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
    assert (last.rank, last.label, last.options) == (7, "ring(rotate=allgather) rank 7", ())
    assert first.rank == 0 and first.label == "ring(rotate=allgather)" and first != last
    by_option = report.setting_of(dict(as_saved, extra=["--benchmark.fake_rank", "3"]))
    assert by_option.rank == 3 and by_option.options == ()


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


def test_max_context_counts_host_memory_per_node(tmp_path):
    """A length whose device peak fits but whose host memory per node (8 ranks of an 8-GPU
    job) exceeds the node's does not fit; host_gib=None checks the device only."""
    spec = functools.partial(runner.RunSpec, CONFIG_8B, 8, style="upipe", chunk_heads=8)
    results = [_estimate_run(spec(4 * M), 60.0, host=200.0),   # 1600 GiB per node
               _estimate_run(spec(5 * M), 70.0, host=260.0)]   # 2080 GiB per node
    path = tmp_path / "est.json"
    runner.save(results, str(path), ["python", "scripts/bench_one_rank.py", "--estimate"])
    points = report.analyze(report.load([str(path)]))
    assert sorted(report.host_per_node_gib(p) for p in points) == [1600.0, 2080.0]

    def best(**kw):
        (m,) = report.max_context(points, device_gib=80, reserve_gib=4, estimated=True, **kw)
        return m.max_len, m.first_fail

    assert best() == (4 * M, 5 * M)  # the default: a 2 TiB node
    assert best(host_gib=None) == (5 * M, None)
    assert best(host_gib=2080.0) == (5 * M, None)


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
    from benchmarks import plots

    assert plots.series(points)["upipe(U=8)"]["est"][-2:] == [70.0, 79.0]
    for png in plots.main([str(path), "--out-dir", str(tmp_path)]):
        assert os.path.getsize(png) > 10_000
