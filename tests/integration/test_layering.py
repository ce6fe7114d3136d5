"""The package's layers and the repository's layout, checked from the source.

* ``cp/`` and ``memory/`` are torch only: they never import TorchTitan, ``titan/``, ``tools/``
  (nor ``memory/`` from ``cp/``), statically or at run time.
* Nothing outside ``tools/`` and ``benchmarks/`` imports ``tools/``; the package never imports
  ``benchmarks`` or ``tests``, and it works without the checkout around it.
* Each module of the package has its test file at the mirrored path:
  ``torchtitan_upipe/cp/ring.py`` -> ``tests/cp/test_ring.py``; a subpackage has
  ``tests/<layer>/test_<package>.py`` or a test per module under ``tests/<layer>/<package>/``.
* Committed files name no machine paths.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.paths import ROOT

ROOT_PATH = Path(ROOT)
PACKAGE = ROOT_PATH / "torchtitan_upipe"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT_PATH).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file, relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            out.update(f"{mod}.{alias.name}" for alias in node.names)
    return out


def _sources(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("layer", ["cp", "memory"])
def test_torch_only_layers_import_no_torchtitan_and_no_upper_layer(layer):
    forbidden = ["torchtitan", "torchtitan_upipe.titan", "torchtitan_upipe.tools", "benchmarks"]
    if layer == "cp":
        forbidden.append("torchtitan_upipe.memory")
    bad = {str(p.relative_to(ROOT_PATH)): sorted(m for m in _imports(p)
                                                 if any(_under(m, f) for f in forbidden))
           for p in _sources(PACKAGE / layer)}
    assert not {k: v for k, v in bad.items() if v}


def test_only_tools_and_benchmarks_import_tools():
    files = [p for p in _sources(PACKAGE) if "tools" not in p.relative_to(PACKAGE).parts[:1]]
    files += [ROOT_PATH / "train.py"]
    bad = {str(p.relative_to(ROOT_PATH)): sorted(m for m in _imports(p)
                                                 if _under(m, "torchtitan_upipe.tools"))
           for p in files}
    assert not {k: v for k, v in bad.items() if v}
    for p in _sources(PACKAGE):
        assert not any(_under(m, "benchmarks") or _under(m, "tests") for m in _imports(p)), p


def test_torch_only_layers_load_without_torchtitan():
    code = ("import sys, torchtitan_upipe.cp, torchtitan_upipe.memory, torchtitan_upipe; "
            "loaded = sorted(m for m in sys.modules if m == 'torchtitan' or "
            "m.startswith(('torchtitan.', 'torchtitan_upipe.titan', 'torchtitan_upipe.tools'))); "
            "assert not loaded, loaded")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_package_works_without_the_checkout(tmp_path):
    """A copy of the package alone, imported from elsewhere: every module loads."""
    shutil.copytree(PACKAGE, tmp_path / "site" / "torchtitan_upipe",
                    ignore=shutil.ignore_patterns("__pycache__"))
    modules = [_module_name(p) for p in _sources(PACKAGE) if p.name != "__main__.py"]
    code = ("import importlib, sys\n"
            "from torchtitan_upipe.titan.cpu_compat import cpu_compat\n"
            "with cpu_compat():\n"
            f"    for m in {modules!r}:\n"
            "        mod = importlib.import_module(m)\n"
            "        assert mod.__file__.startswith(sys.argv[1]), (m, mod.__file__)\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site")], env=env,
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _public_modules() -> list[Path]:
    """Modules and subpackages of the layers (``torchtitan_upipe/<layer>/<name>``)."""
    out = []
    for layer in ("cp", "memory", "titan", "tools"):
        for entry in sorted((PACKAGE / layer).iterdir()):
            if entry.name.startswith("_"):
                continue
            if entry.suffix == ".py" or (entry.is_dir() and (entry / "__init__.py").exists()):
                out.append(entry)
    return out


@pytest.mark.parametrize("source", _public_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_has_its_test_file_at_the_mirrored_path(source):
    rel = source.relative_to(PACKAGE)
    tests = ROOT_PATH / "tests" / rel.parent
    name = source.stem
    if (tests / f"test_{name}.py").exists():
        return
    assert source.is_dir(), f"no tests/{rel.parent}/test_{name}.py"
    modules = [p.stem for p in source.glob("*.py") if not p.name.startswith("_")]
    missing = [m for m in modules if not (tests / name / f"test_{m}.py").exists()]
    assert not missing, f"no tests/{rel.parent}/test_{name}.py, nor tests for {missing}"


def _tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT_PATH / f for f in out.stdout.split()]


def test_committed_files_name_no_machine_paths():
    markers = ("/work/", "/home/", "/root/", "/Users/", "site-packages/")
    offenders = {}
    for path in _tracked_files():
        if path.suffix in (".png",) or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        hits = [m for m in markers if m in text]
        if path == Path(__file__):
            continue
        if hits:
            offenders[str(path.relative_to(ROOT_PATH))] = hits
    assert not offenders
