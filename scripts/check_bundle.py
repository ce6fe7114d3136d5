"""Check a bundle of wheels for the GPU machine before it travels (scripts/gpu_bundle.sh).

    python scripts/check_bundle.py .whl

The GPU machine runs CPython 3.12 on x86_64 Linux with no network, and what travels with a
device call is at most 64 MiB.  The bundle passes when every wheel installs there (a
``py3``/``py312``/``cp312`` tag, ``none`` or ``manylinux*_x86_64`` platform), each package
comes once, the bundle fits ``--limit-mib``, and every requirement of a wheel (markers
evaluated for Python 3.12 on Linux, extras left out) is in the bundle or in the machine's
image (:data:`IMAGE`, the package list the device notes record for the nvidia-h200 image).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import zipfile

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

# What the GPU machine's image holds that the bundle's wheels need (device notes, KINDS.md,
# read 2026-11-17): torch 2.11 with triton and CUDA 13, and the usual scientific stack.
IMAGE = frozenset(canonicalize_name(n) for n in (
    "torch", "triton", "tensorboard", "tokenizers", "einops", "numpy", "pandas", "pyarrow",
    "fsspec", "huggingface-hub", "requests", "urllib3", "tqdm", "packaging", "pyyaml",
    "filelock", "pillow", "aiohttp", "rich", "safetensors", "typing-extensions", "psutil",
    "jinja2", "sympy", "networkx", "protobuf", "regex", "xxhash", "pytest",
))

TARGET = dict(default_environment(), python_version="3.12", python_full_version="3.12.3",
              implementation_name="cpython", platform_python_implementation="CPython",
              sys_platform="linux", platform_system="Linux", platform_machine="x86_64",
              os_name="posix", extra="")


def _installs_there(tag) -> bool:
    return (tag.interpreter in ("py3", "py312", "cp312") and tag.abi in ("none", "abi3", "cp312")
            and (tag.platform == "any" or (tag.platform.startswith("manylinux")
                                           and tag.platform.endswith("x86_64"))))


def requirements(path: str) -> list[Requirement]:
    """The wheel's ``Requires-Dist`` that apply on the GPU machine (no extras)."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in lines
            if line.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(TARGET)]


def check(folder: str, limit_mib: float = 64.0) -> list[str]:
    """The bundle's problems, one line each (empty: it is good to go)."""
    wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
    if not wheels:
        return [f"no wheels in {folder}"]
    problems, names = [], {}
    for path in wheels:
        name, version, _, tags = parse_wheel_filename(os.path.basename(path))
        if name in names:
            problems.append(f"{name} twice: {names[name]} and {version} (one version stops the install)")
        names[name] = version
        if not any(_installs_there(t) for t in tags):
            problems.append(f"{os.path.basename(path)} does not install on CPython 3.12 x86_64 Linux")
    for path in wheels:
        for req in requirements(path):
            needed = canonicalize_name(req.name)
            if needed not in names and needed not in IMAGE:
                problems.append(f"{os.path.basename(path)} needs {req}, in neither the bundle "
                                f"nor the GPU image")
    total = sum(os.path.getsize(p) for p in wheels) / 2**20
    if total > limit_mib:
        problems.append(f"the bundle is {total:.1f} MiB, over the {limit_mib:g} MiB a call carries")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", help="the bundle's folder (.whl)")
    ap.add_argument("--limit-mib", type=float, default=64.0)
    args = ap.parse_args(argv)
    problems = check(args.folder, args.limit_mib)
    wheels = glob.glob(os.path.join(args.folder, "*.whl"))
    size = sum(os.path.getsize(p) for p in wheels) / 2**20
    for line in problems:
        print("PROBLEM", line)
    print(f"{len(wheels)} wheels, {size:.1f} MiB: {'ok' if not problems else 'NOT ok'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
