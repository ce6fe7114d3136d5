"""The memory tables (benchmarks/memory_table.py): the analytic model's tables, and the model
next to the CPU estimator's full-depth figures for the same train.py options."""

from __future__ import annotations

import functools

from torchtitan_upipe.titan import memory_model as mm

M = 1 << 20


def _8b(style="upipe", seq=5 * M, on=True, chunk_heads=8) -> mm.Setup:
    st = mm.from_flavor("8B", seq_len=seq, cp=8, world=8, style=style, chunk_heads=chunk_heads)
    return mm.stack(st, on)


def test_memory_table_script_runs(capsys):
    from benchmarks import memory_table as mod

    mod.main(["--markdown"])
    out = capsys.readouterr().out
    assert "| upipe 5M stack on |" in out and "| usp 8x2 4M stack on |" in out
    assert "| upipe 5M stack on, prefetch off |" in out


def test_keep_attention_table(capsys):
    """``--keep``: peak and host GiB per keep_attention_output choice, 128K to 5M."""
    from benchmarks import memory_table as mod

    mod.main(["--keep", "--markdown"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| upipe | 1M |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    none, device, host = (float(c) for c in cells[2:5])
    assert none < host < device  # one prefetched result on the device, or all L of them
    assert float(cells[6]) > float(cells[5])  # "host" adds L results to the host
    assert "| ulysses | 5M |" in out and "| upipe | 128K |" in out


def test_memory_table_compares_estimates_with_the_model(tmp_path, capsys):
    """``--estimates``: each full-depth estimator run next to the model of the same options
    (parsed from its config and overrides as train.py parses them)."""
    from benchmarks import memory_table as mod
    from benchmarks import runner

    run = functools.partial(runner.RunSpec, "train_configs/llama3_8b_8xh100_upipe.toml", 8,
                            3 * M, style="upipe", chunk_heads=8)
    results = [runner.RunResult(run(extra=["--memory.no-offload-prefetch"]), "cmd", ok=True,
                                oom=False, kind="estimate", est_peak_gib=50.0, est_host_gib=93.0),
               runner.RunResult(run(n_layers=2), "cmd", ok=True, oom=False, kind="estimate",
                                est_peak_gib=40.0, est_host_gib=3.0)]  # not full depth: left out
    path = tmp_path / "est.json"
    runner.save(results, str(path), ["test"])
    mod.main(["--estimates", str(path)])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| upipe")]
    model = mm.breakdown(mm.replace(_8b("upipe", 3 * M), offload_prefetch=False))["peak_device"]
    assert rows == [f"| upipe(U=8) S={3 * M} L=all --memory.no-offload-prefetch | 50.00 | "
                    f"{model / mm.GiB:.2f} | {100 * (model / mm.GiB / 50 - 1):+.1f}% | 93.00 |"]


def test_wall_table(capsys):
    """``--wall``: each option past the paper's wall alone, all six together, and with
    segment checkpointing, per setup; together they reach further than any alone; on the 32B
    flavor a 2 TiB node's host memory binds before the device does, until offload_stride = 2
    halves it (the device is unchanged)."""
    from benchmarks import memory_table as mod

    mod.main(["--wall", "--markdown"])
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == len(mod.WALL_SETUPS) * len(mod.WALL_CHANGES)
    assert [c for c, _ in mod.WALL_CHANGES][-2:] == ["all six", "all six, offload_stride = 2"]
    for name, *_ in mod.WALL_SETUPS:
        mine = [r for r in rows if r[0] == name]
        device = [float(r[4].rstrip("M")) for r in mine]
        host_bound = [float(r[6].rstrip("M")) for r in mine]
        host_node = [float(r[5]) for r in mine]
        assert device[-2] > max(device[:-2]) > device[0]
        assert device[-1] == device[-2] and host_node[-1] < 0.6 * host_node[-2]
        assert all(h <= d for h, d in zip(host_bound, device))
        assert host_bound[-1] == device[-1]
        if name.startswith("32B"):
            assert host_bound[-2] < device[-2]
