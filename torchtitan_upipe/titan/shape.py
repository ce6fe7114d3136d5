"""One description of a job's shape: the model's sizes and the context-parallel layout.

:class:`JobShape` is built once, from train.py's options (:meth:`JobShape.from_job_config`)
or from a flavor and options (:meth:`JobShape.from_flavor`), and every derived quantity is
read from it: the config checks, the process groups, the analytic memory model, the
communication model, the CPU estimator and the benchmark report.  Nothing else derives them.

Notation (per job): ``S`` tokens per sample, ``B`` samples per rank, ``C`` the CP degree,
``u`` the all-to-all (Ulysses) degree, ``R = C / u`` the ring degree, ``U`` UPipe's query
heads per stage across the ``u`` ranks, ``rho`` the KV-head replication of an all-to-all over
``u`` ranks, ``N`` the ranks FSDP shards over::

    style      u                       R        U
    none       1                       1        0
    ring       1 (TorchTitan's ring)   C        0
    ulysses    C                       1        0
    usp        ulysses_degree or C     C / u    0
    upipe      ulysses_degree or C     C / u    upipe_chunk_heads or u

The style registry (:mod:`.styles`) owns that table (:meth:`CPStyle.layout`); building a
shape resolves it and checks nothing else: :func:`~.checks.validate_job_config` does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from ..cp.gqa import kv_replication
from ..cp.upipe.schedule import UPipeSchedule
from .llama3 import FLAVORS, head_dim_of
from .sharding import padded_length
from .styles import get_style


def model_seq_len(job_config) -> int:
    """The sequence length the model runs on: ``training.seq_len``, padded to
    :func:`padded_length` with ``context_parallel.pad_seq_len`` (the data keep
    ``training.seq_len``; the trainer pads each sample)."""
    seq_len = job_config.training.seq_len
    cp = getattr(job_config, "context_parallel", None)
    degree = job_config.parallelism.context_parallel_degree
    if cp is None or not cp.pad_seq_len or degree <= 1:
        return seq_len
    u, _ = get_style(cp.style).layout(degree, cp.ulysses_degree, 0)
    return padded_length(seq_len, degree, degree // u)


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama3 model: what memory and communication depend on."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_hidden: int
    vocab: int

    @classmethod
    def from_args(cls, args, n_layers: int | None = None) -> ModelShape:
        """From TorchTitan's Llama3 ``TransformerModelArgs`` (or :class:`~.llama3.LlamaArgs`).

        The MLP width is TorchTitan's ``FeedForward(dim, 4 * dim, multiple_of, multiplier)``
        rule: ``multiple_of * ceil(multiplier * int(2 * 4 dim / 3) / multiple_of)``.
        """
        hidden = int(2 * 4 * args.dim / 3)
        if args.ffn_dim_multiplier is not None:
            hidden = int(args.ffn_dim_multiplier * hidden)
        hidden = args.multiple_of * ((hidden + args.multiple_of - 1) // args.multiple_of)
        return cls(args.dim, n_layers or args.n_layers, args.n_heads,
                   args.n_kv_heads or args.n_heads, head_dim_of(args), hidden, args.vocab_size)

    @classmethod
    def from_flavor(cls, flavor: str, n_layers: int | None = None) -> ModelShape:
        """A flavor of :data:`~.llama3.FLAVORS` (TorchTitan's Llama3 flavors and ``32B``)."""
        return cls.from_args(FLAVORS[flavor], n_layers)

    # ---- parameters per FSDP unit (TorchTitan's apply_fsdp: embedding, each block, the rest)
    @property
    def block_params(self) -> int:
        """One transformer block: ``wq, wo`` (``H D dim`` each), ``wk, wv`` (``H_kv D dim``),
        the MLP ``3 F dim`` and the two RMSNorm weights ``2 dim``."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return self.dim * (2 * q + 2 * kv) + 3 * self.dim * self.ffn_hidden + 2 * self.dim

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.dim

    @property
    def output_params(self) -> int:
        """``norm + output`` (one FSDP unit in TorchTitan)."""
        return self.vocab * self.dim + self.dim

    @property
    def total_params(self) -> int:
        return self.n_layers * self.block_params + self.embedding_params + self.output_params


@dataclass(frozen=True)
class JobShape:
    """A job's model and CP layout, with ``u`` and ``U`` resolved (see the module docstring).

    Build it with :meth:`build`, :meth:`from_flavor` or :meth:`from_job_config`.
    """

    model: ModelShape
    seq_len: int
    style: str = "none"
    cp: int = 1
    ulysses: int = 1
    chunk_heads: int = 0
    batch: int = 1
    world: int = 1

    @classmethod
    def build(cls, model: ModelShape, seq_len: int, style: str = "none", cp: int = 1,
              ulysses_degree: int = 0, chunk_heads: int = 0, batch: int = 1,
              world: int = 0) -> JobShape:
        """Resolve ``[context_parallel]`` options (``ulysses_degree``, ``upipe_chunk_heads``:
        0 = default) for ``style`` over ``cp`` ranks; ``world`` 0 means ``cp``."""
        u, big_u = get_style(style).layout(cp, ulysses_degree, chunk_heads)
        return cls(model, seq_len, style, cp, u, big_u, batch, world or cp)

    @classmethod
    def from_flavor(cls, flavor: str, seq_len: int, **options) -> JobShape:
        """:meth:`build` for a flavor of :data:`~.llama3.FLAVORS`."""
        return cls.build(ModelShape.from_flavor(flavor), seq_len, **options)

    @classmethod
    def from_job_config(cls, job_config, world: int, model_args=None,
                        chunk_heads: int | None = None) -> JobShape:
        """The job train.py's options describe on ``world`` ranks.  ``model_args`` default to
        the configured ``model.name``/``model.flavor`` (:func:`~.checks.model_args`);
        ``benchmark.n_layers`` limits the depth; ``chunk_heads`` stands for
        ``upipe_chunk_heads`` (how ``"auto"`` tries each ``U``)."""
        from .checks import model_args as configured_model_args

        args = configured_model_args(job_config) if model_args is None else model_args
        bench = getattr(job_config, "benchmark", None)
        cp = job_config.context_parallel
        if chunk_heads is None:
            chunk_heads = cp.upipe_chunk_heads
        if chunk_heads == "auto":
            raise ValueError("context_parallel.upipe_chunk_heads='auto' is resolved at config "
                             "time (checks.validate_job_config); resolve it before building "
                             "the job's shape")
        tr = job_config.training
        return cls.build(
            ModelShape.from_args(args, bench.n_layers if bench is not None else None),
            model_seq_len(job_config), cp.style, job_config.parallelism.context_parallel_degree,
            cp.ulysses_degree, chunk_heads, tr.local_batch_size, world,
        )

    def with_layers(self, n_layers: int) -> JobShape:
        return replace(self, model=replace(self.model, n_layers=n_layers))

    # ---- the layout -----------------------------------------------------------------------
    @property
    def ring(self) -> int:
        """``R = C / u``: ranks of the ring dimension (1: no ring)."""
        return self.cp // self.ulysses

    @property
    def builtin_ring(self) -> bool:
        """TorchTitan's DTensor ring attention (style ``ring``) rather than this plugin's."""
        return get_style(self.style).builtin_ring

    @property
    def local_seq(self) -> int:
        """``s = S / C``: tokens per rank."""
        return self.seq_len // self.cp

    @property
    def local_tokens(self) -> int:
        """``T = B s``: tokens this rank holds."""
        return self.batch * self.local_seq

    @property
    def attention_call(self) -> tuple[int, int]:
        """``(query tokens, query heads)`` of this rank's largest attention kernel call: the
        ring rank's ``S / R`` tokens after the all-to-all, for ``H / u`` heads (Ulysses) or a
        stage's ``U / u`` (UPipe)."""
        heads = (self.schedule.heads_per_rank if self.schedule is not None
                 else self.model.n_heads // self.ulysses)
        return self.seq_len // self.ring, heads

    @functools.cached_property
    def rho(self) -> int:
        """KV-head replication of the all-to-all over ``u`` ranks (:func:`~..cp.gqa.kv_replication`;
        raises for head counts that cannot be split)."""
        return kv_replication(self.model.n_heads, self.model.n_kv_heads, self.ulysses)

    @functools.cached_property
    def schedule(self) -> UPipeSchedule | None:
        """UPipe's stage schedule over the ``u`` ranks; ``None`` for styles without stages."""
        if not self.chunk_heads:
            return None
        return UPipeSchedule(self.model.n_heads, self.model.n_kv_heads, self.ulysses,
                             self.chunk_heads)
