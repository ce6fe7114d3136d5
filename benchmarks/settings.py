"""What each benchmark run measured: its :class:`Setting`, resolved from the run's spec (as
:mod:`.runner` saved it) against its TOML config and train.py overrides.

Runs of one setting at different lengths and depths are points of one curve; runs that
differ in anything else (an extra train.py option, the simulated rank) are different
settings.  The CP layout is resolved by the style registry (``CPStyle.layout``), the same
resolution :class:`~torchtitan_upipe.titan.shape.JobShape` uses.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from torchtitan_upipe.titan.shape import JobShape, ModelShape
from torchtitan_upipe.titan.styles import get_style
from torchtitan_upipe.tools.perf_model.comm import CommJob

from . import paper
from .runner import ROOT


@dataclass(frozen=True)
class Setting:
    """What a run measured, resolved from its config file, spec and extra arguments."""

    config: str
    flavor: str
    full_layers: int
    style: str
    cp_degree: int
    ngpu: int
    ulysses_degree: int
    """``context_parallel.ulysses_degree`` as given (0 = the default)."""
    chunk_heads: int
    """UPipe's ``U``, resolved (0 for other styles)."""
    batch: int
    act_bytes: int
    rotate_method: str = "allgather"
    rank: int = 0
    """The simulated rank (``benchmark.fake_rank``): a causal ring's ranks differ in memory."""
    options: tuple[str, ...] = ()
    """Any other ``section.key=value`` overrides of the run (``memory.offload_prefetch``...):
    runs that differ in them are different settings, never merged into one point."""

    @property
    def ulysses(self) -> int:
        """The all-to-all degree ``u``, resolved by the style."""
        return get_style(self.style).layout(self.cp_degree, self.ulysses_degree, 0)[0]

    @property
    def label(self) -> str:
        u = self.ulysses
        if self.style == "upipe":
            name = f"upipe(U={self.chunk_heads}" + (f",u={u})" if u != self.cp_degree else ")")
        elif self.style == "usp":
            name = f"usp(u={u})"
        elif get_style(self.style).builtin_ring:  # TorchTitan's ring: say how K/V rotate
            name = f"{self.style}(rotate={self.rotate_method})"
        else:
            name = self.style
        if self.rank:
            name += f" rank {self.rank}"
        return f"{name} [{', '.join(self.options)}]" if self.options else name

    @property
    def paper_key(self) -> tuple[str, int]:
        return self.flavor, self.cp_degree

    def paper_row(self) -> str | None:
        """The paper's row this setting reproduces (:func:`.paper.row_of`)."""
        return paper.row_of(self.paper_key, self.style, self.ulysses, self.chunk_heads)

    def paper_max_context(self) -> int | None:
        row = self.paper_row()
        return paper.max_context(self.paper_key)[row] if row else None

    def shape(self, seq_len: int) -> JobShape:
        return JobShape.build(ModelShape.from_flavor(self.flavor), seq_len, self.style,
                              self.cp_degree, self.ulysses_degree, self.chunk_heads, self.batch,
                              self.ngpu)

    def comm_job(self, seq_len: int) -> CommJob:
        return CommJob(self.shape(seq_len), self.act_bytes, self.act_bytes,
                       rotate_method=self.rotate_method)


def display_names(settings) -> dict[Setting, str]:
    """Short unique names: the style label, plus model/degrees, plus the config if needed."""
    settings = sorted(set(settings), key=lambda s: (s.label, s.flavor, s.cp_degree, s.ngpu, s.config))
    names = {s: s.label for s in settings}
    for extend in (lambda s: f"{s.flavor} C={s.cp_degree} N={s.ngpu}",
                   lambda s: os.path.basename(s.config)):
        seen: dict[str, int] = defaultdict(int)
        for n in names.values():
            seen[n] += 1
        names = {s: (f"{n} [{extend(s)}]" if seen[n] > 1 else n) for s, n in names.items()}
    return names


def _overrides(extra: list[str]) -> dict[str, str]:
    """``--section.key value`` / ``--section.key=value`` pairs of train.py arguments."""
    out, i = {}, 0
    while i < len(extra):
        arg = extra[i]
        if arg.startswith("--") and "." in arg:
            if "=" in arg:
                key, val = arg[2:].split("=", 1)
            elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
                key, val = arg[2:], extra[i + 1]
                i += 1
            else:
                key, val = arg[2:], "true"
            out[key.replace("-", "_")] = val
        i += 1
    return out


def _config_path(path: str) -> str:
    return path if os.path.isabs(path) or os.path.exists(path) else os.path.join(ROOT, path)


# overrides that setting_of resolves into Setting fields (the rotate method matters to
# TorchTitan's ring only; gpu_bench.sh passes it to every style), or that do not change what is
# measured
_RESOLVED = {"model.flavor", "context_parallel.style", "context_parallel.ulysses_degree",
             "context_parallel.upipe_chunk_heads", "parallelism.context_parallel_degree",
             "training.mixed_precision_param", "training.local_batch_size",
             "parallelism.context_parallel_rotate_method", "benchmark.fake_rank",
             "metrics.save_for_all_ranks"}


def setting_of(spec: dict) -> Setting:
    """Resolve a run's spec (as saved) against its TOML config: what the job really was."""
    from torchtitan_upipe.titan.llama3 import FLAVORS

    with open(_config_path(spec["config"]), "rb") as f:
        toml = tomllib.load(f)
    ov = _overrides(list(spec.get("extra") or []))

    def get(section: str, key: str, default):
        val = ov.get(f"{section}.{key}", toml.get(section, {}).get(key, default))
        return type(default)(val) if not isinstance(default, str) else str(val)

    flavor = get("model", "flavor", "debugmodel")
    style = spec.get("style") or get("context_parallel", "style", "none")
    u = spec.get("ulysses_degree")
    u = get("context_parallel", "ulysses_degree", 0) if u is None else u
    chunk = spec.get("chunk_heads")
    chunk = get("context_parallel", "upipe_chunk_heads", 0) if chunk is None else chunk
    cp = get("parallelism", "context_parallel_degree", 1)
    dtype = get("training", "mixed_precision_param", "bfloat16")
    options = tuple(sorted(f"{k}={v}" for k, v in ov.items() if k not in _RESOLVED))
    _, big_u = get_style(style).layout(cp, u, chunk)
    return Setting(
        config=spec["config"], flavor=flavor, full_layers=FLAVORS[flavor].n_layers, style=style,
        cp_degree=cp, ngpu=int(spec.get("ngpu") or cp), ulysses_degree=u, chunk_heads=big_u,
        batch=get("training", "local_batch_size", 1), act_bytes=4 if dtype == "float32" else 2,
        rotate_method=get("parallelism", "context_parallel_rotate_method", "allgather")
        if get_style(style).builtin_ring else "allgather",
        rank=int(spec.get("rank") or get("benchmark", "fake_rank", 0)),
        options=options,
    )
