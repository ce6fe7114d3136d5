"""The sweep behind ``scripts/bench_one_rank.py``: its command line and end-to-end runs on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import report
from tests.helpers.bench_data import CONFIG_8B, M
from tests.helpers.paths import ROOT


def test_bench_cli_parsing():
    from benchmarks import sweep as b

    assert b.parse_len("128K") == 131072 and b.parse_len("5M") == 5 * M and b.parse_len("512") == 512
    assert b.parse_style("upipe:16") == {"style": "upipe", "chunk_heads": 16}
    assert b.parse_style("usp:u=8") == {"style": "usp", "chunk_heads": 0, "ulysses_degree": 8}
    assert b.parse_style("ulysses") == {"style": "ulysses", "chunk_heads": 0, "ulysses_degree": 0}
    assert b.parse_style("ring") == {"style": "ring", "chunk_heads": 0}
    assert b.parse_style("config") == {"style": None}
    assert b.parse_style("upipe:U=8,u=4") == {"style": "upipe", "chunk_heads": 8, "ulysses_degree": 4}
    assert b.parse_style("ring:r=7") == {"style": "ring", "chunk_heads": 0, "rank": 7}


def test_a_rank_outside_the_job_is_refused():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "bench_one_rank.py"), "--config", CONFIG_8B,
         "--styles", "ring:r=8", "--seq-lens", "128K", "--out", "/dev/null"],
        check=False, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "rank r=8 is not a rank of the 8-rank job; valid: 0 to 7" in proc.stderr


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


def test_a_sweep_stops_at_its_first_out_of_memory_and_skips_past_timeouts():
    from types import SimpleNamespace

    from benchmarks import runner, sweep

    calls = []

    def fake_run(spec, timeout):
        calls.append((spec.seq_len, spec.n_layers))
        if spec.seq_len == 4 * M:  # a timeout: longer lengths at >= this depth are skipped
            return runner.RunResult(spec, "cmd", ok=False, oom=False, error="timeout after 1 s")
        if spec.seq_len == 8 * M:
            return runner.RunResult(spec, "cmd", ok=False, oom=True, oom_kind="host")
        return runner.RunResult(spec, "cmd", ok=True, oom=False)

    args = SimpleNamespace(seq_lens=[M, 4 * M, 8 * M, 16 * M], layers=[1], config=CONFIG_8B,
                           ngpu=8, steps=2, warmup=1, timeout=1, estimate=False)
    recorded = []
    sweep.sweep({"style": "upipe"}, args, [], lambda res, wall: recorded.append(res), run=fake_run)
    assert calls == [(M, 1), (4 * M, 1)]  # 8M and 16M skipped after the timeout at 4M
    calls.clear()
    args.seq_lens, args.layers = [M, 8 * M, 16 * M], [1, 2]
    sweep.sweep({"style": "upipe"}, args, [], lambda res, wall: None, run=fake_run)
    assert calls == [(M, 1), (M, 2), (8 * M, 1)]  # nothing after the first OOM


def test_the_dry_run_validates_every_command_line_for_the_gpu_job(capsys, tmp_path):
    """``--dry-run`` runs nothing: each run's options are parsed and validated for the N-rank
    CUDA job, so an option the GPU run would reject fails here, on CPU, by name."""
    from benchmarks import sweep

    argv = ["--config", CONFIG_8B, "--ngpu", "8", "--styles", "upipe:8", "upipe:3",
            "--seq-lens", "128K", "--layers", "2", "--steps", "3", "--warmup", "1",
            "--out", str(tmp_path / "unused.json"), "--dry-run"]
    assert sweep.main(argv) == 1
    lines = capsys.readouterr().out.splitlines()
    ok = [line for line in lines if line.startswith("ok ")]
    bad = [line for line in lines if line.startswith("INVALID ")]
    assert len(ok) == 1 and ok[0].startswith("ok upipe(U=8) S=131072 L=2: NGPU=8 python train.py")
    assert len(bad) == 1 and "context_parallel.upipe_chunk_heads=3" in bad[0] and "valid: [8, 16, 32]" in bad[0]
    assert not (tmp_path / "unused.json").exists()
