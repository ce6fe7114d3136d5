"""The plots: PNGs of memory and tokens/s per GPU against length."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers.bench_data import synthetic
from tests.helpers.paths import ROOT


@pytest.fixture(scope="module")
def synthetic_json(tmp_path_factory):
    return synthetic(tmp_path_factory.mktemp("bench") / "synthetic.json")


def test_plot_writes_pngs(synthetic_json, tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "plot_benchmarks.py"), str(synthetic_json),
         "--out-dir", str(tmp_path), "--prefix", "syn"], check=False, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    for name in ("syn_memory.png", "syn_throughput.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
