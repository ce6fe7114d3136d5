"""Synthetic benchmark results with known answers, for the report and plot tests."""

from __future__ import annotations

from benchmarks import paper, runner

M = 2**20
CONFIG_8B = "train_configs/llama3_8b_8xh100_upipe.toml"


def mem(style, layers, seq):
    """Affine in layers: full depth (32) = 26 + a * S/M GiB, a = 12.25 (upipe) or 15 (ulysses)."""
    a = 12.25 if style == "upipe" else 15.0
    return 10.0 + 0.5 * layers + a * seq / M


def step(layers, seq):
    return 0.5 + 0.2 * layers * (seq / (128 * 1024)) ** 2


def synthetic(path, full_err=0.1):
    results = []
    styles = [{"style": "upipe", "chunk_heads": 8},
              {"style": "ulysses", "chunk_heads": 0, "ulysses_degree": 0}]
    for st in styles:
        for seq in paper.GRID[:8]:
            for layers in (1, 2):
                spec = runner.RunSpec(CONFIG_8B, 8, seq, layers, steps=3, warmup=1, **st)
                if st["style"] == "ulysses" and seq >= 4 * M:
                    results.append(runner.RunResult(spec, "cmd", ok=False, oom=True, error="OutOfMemoryError"))
                    continue
                results.append(runner.RunResult(
                    spec, "cmd", ok=True, oom=False, reserved_gib=mem(st["style"], layers, seq),
                    active_gib=mem(st["style"], layers, seq) - 1, step_s=step(layers, seq),
                    tps=seq / (8 * step(layers, seq))))
        # one full-depth run at 128K, 10 % above the fit (time) and exactly on it (memory)
        spec = runner.RunSpec(CONFIG_8B, 8, 128 * 1024, 0, steps=3, warmup=1, **st)
        results.append(runner.RunResult(
            spec, "cmd", ok=True, oom=False, reserved_gib=mem(st["style"], 32, 128 * 1024),
            active_gib=1.0, step_s=step(32, 128 * 1024) * (1 + full_err), tps=1.0))
    runner.save(results, str(path), ["python", "scripts/bench_one_rank.py", "--synthetic"])
    return path
