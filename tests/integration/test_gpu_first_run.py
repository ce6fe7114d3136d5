"""The prepared device run (scripts/gpu_first_run.sh) passes its dry run on CPU, and the
checks it relies on catch what they are for: a bundle that would not install on the GPU
machine, a benchmark command line that would not parse there."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import zipfile

import pytest

from tests.helpers.paths import ROOT

SCRIPTS = os.path.join(ROOT, "scripts")
STEPS = ["env", "install", "cuda_tests", "trainer", "bench_128k", "bench_1m", "estimate_128k",
         "estimate_1m"]


@pytest.mark.slow
def test_the_device_script_passes_its_cpu_dry_run(tmp_path):
    """Every step runs in order within the budget; the wheels build for Python 3.12 and fit;
    the CUDA tests are collected and skipped, none passed; every benchmark and estimator
    command line parses and validates for the 8-rank CUDA job."""
    out = tmp_path / "out"
    env = dict(os.environ, DRY_RUN="1", OUT=str(out), WHL_DIR=str(tmp_path / "whl"),
               SITE=str(tmp_path / "site"), PY=sys.executable)
    proc = subprocess.run(["bash", os.path.join(SCRIPTS, "gpu_first_run.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    with open(out / "steps.tsv") as f:
        steps = {row["step"]: row for row in csv.DictReader(f, delimiter="\t")}
    assert list(steps) == STEPS
    assert {name: row["status"] for name, row in steps.items()} == dict.fromkeys(STEPS, "ok"), steps
    assert sum(int(row["seconds"]) for row in steps.values()) < 540

    log = {name: (out / f"{name}.log").read_text() for name in STEPS}
    assert re.search(r"\d+ wheels, [\d.]+ MiB: ok", log["install"]), log["install"][-2000:]
    for name in ("cuda_tests", "trainer"):
        assert re.search(r"\d+ skipped", log[name]) and "passed" not in log[name], log[name][-2000:]
    for name, runs in (("bench_128k", 3), ("bench_1m", 1), ("estimate_128k", 2), ("estimate_1m", 1)):
        assert len(re.findall(r"^ok ", log[name], re.M)) == runs and "INVALID" not in log[name], log[name]
    assert "--parallelism.context_parallel_rotate_method alltoall" in log["bench_128k"]
    assert (out / "env.json").exists() and (out / "cuda_tests.xml").exists()


def _wheel(folder, name, version, tag="py3-none-any", requires=()):
    path = folder / f"{name}-{version}-{tag}.whl"
    meta = "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{meta}")
    return path


def test_a_bundle_that_would_not_install_on_the_gpu_machine_is_refused(tmp_path):
    sys.path.insert(0, SCRIPTS)
    try:
        import check_bundle
    finally:
        sys.path.remove(SCRIPTS)
    _wheel(tmp_path, "alpha", "1.0", requires=["torch>=2", "beta", "gamma; python_version < '3.10'",
                                                "delta; extra == 'test'", "missing-pkg"])
    _wheel(tmp_path, "beta", "2.0")
    _wheel(tmp_path, "beta", "2.1")
    _wheel(tmp_path, "native", "1.0", tag="cp311-cp311-manylinux_2_17_x86_64")
    problems = check_bundle.check(str(tmp_path), limit_mib=64)
    assert sorted(problems) == sorted([
        "alpha-1.0-py3-none-any.whl needs missing-pkg, in neither the bundle nor the GPU image",
        "beta twice: 2.0 and 2.1 (one version stops the install)",
        "native-1.0-cp311-cp311-manylinux_2_17_x86_64.whl does not install on CPython 3.12 x86_64 Linux",
    ])
    assert any("over the 1e-06 MiB" in p for p in check_bundle.check(str(tmp_path), 1e-6))
    assert check_bundle.check(str(tmp_path / "none")) == [f"no wheels in {tmp_path / 'none'}"]
