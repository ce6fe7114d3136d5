"""Run the CPU memory estimator (``python -m torchtitan_upipe.tools.estimate``) in a subprocess
and read its JSON: a fresh process per estimate, as a user runs it (the fake process group
and the patches it installs are the process's own)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers.paths import ROOT


def estimate(tmp_path, ngpu: int, *args: str, real: bool = False, check: bool = True,
             target: str = "cpu"):
    """The estimate's JSON (``--real``: the real-tensor measurement), or with ``check=False``
    the finished process, for the tests of its errors."""
    out = tmp_path / f"est_{'real' if real else 'fake'}_{target}.json"
    cmd = [sys.executable, "-m", "torchtitan_upipe.tools.estimate", "--ngpu", str(ngpu),
           "--target", target, "--out", str(out), *args] + (["--real"] if real else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    if not check:
        return proc
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())
