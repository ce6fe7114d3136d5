#!/usr/bin/env bash
# Download the wheels a GPU machine without network lacks into .whl/ (git-ignored), so that
# scripts/gpu_bench.sh can install them there with `pip install --no-index`.
#
# The GPU machine has Python 3.12, torch 2.11+cu130, triton, tensorboard, tokenizers, einops,
# numpy, pandas, pyarrow, fsspec, huggingface-hub and matplotlib, but not TorchTitan and the
# packages below.  Versions are pinned to the ones installed in this checkout's .venv (the
# environment the CPU tests pass in); typing-extensions is included because typeguard needs a
# newer one than torch requires.  Every wheel is for CPython 3.12 on manylinux x86_64; a pure
# python wheel (py3-none-any, py312-none-any) matches those tags as well.
#
#   scripts/gpu_bundle.sh            # then: run scripts/gpu_bench.sh on the GPU machine
#   VENV_PY=/path/to/python scripts/gpu_bundle.sh   # read the pins from another environment
set -euo pipefail
cd "$(dirname "$0")/.."

VENV_PY=${VENV_PY:-.venv/bin/python}
PIP_PY=${PIP_PY:-python3}
PACKAGES=(torchtitan tyro docstring-parser typeguard tomli torchdata datasets dill multiprocess
          xxhash typing-extensions)

WHL_DIR=${WHL_DIR:-.whl}
mkdir -p "$WHL_DIR"
for name in "${PACKAGES[@]}"; do
    version=$("$VENV_PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    "$PIP_PY" -m pip download -q --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHL_DIR" "$name==$version"
    echo "$name==$version"
done
ls -1 "$WHL_DIR"
du -ch "$WHL_DIR"/*.whl | tail -1
