"""The context-parallel styles, one small class each, registered by name.

``[context_parallel] style`` names one of them.  A style says

* how it lays the CP ranks out (:meth:`CPStyle.layout`: the all-to-all degree ``u`` and
  UPipe's ``U``, which :class:`~.shape.JobShape` resolves once),
* what it checks at config time (:meth:`CPStyle.check`, on top of the checks every job gets
  in :func:`~.checks.validate_job_config`),
* how the trainer shards a batch's sequence for it (:meth:`CPStyle.sharder`; ``None``:
  TorchTitan's own, the head-tail load balancer),
* how it installs itself in the model (:meth:`CPStyle.install`),
* and, as class attributes, whether it needs CUDA, whether the CPU memory estimator can run
  it, which ``[context_parallel]`` options it reads, and whether its ring is TorchTitan's.

Adding a style is one subclass decorated with :func:`register_style` plus its tests
(``tests/titan/test_styles.py`` checks that every registered style has them).
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn
from torchtitan.tools.logging import logger

from ..cp.kernels import get_kernel
from ..cp.kernels.base import FA2_OFFSET_LIMIT, fa2_backward_offset
from ..cp.upipe.schedule import resolve_chunk_heads, valid_chunk_heads
from .attention import (
    ContextParallelAttention,
    CPAttentionStrategy,
    UlyssesStrategy,
    UPipeStrategy,
    check_fusable_wo,
    check_sharding_once,
)
from .config import ConfigError
from .metrics import AttentionTimer
from .sharding import SequenceSharder, padded_length, sharder_for

if TYPE_CHECKING:
    from .groups import CPGroups
    from .parallelize import CPPlan
    from .shape import JobShape

_REGISTRY: dict[str, type[CPStyle]] = {}


def register_style(cls: type[CPStyle]) -> type[CPStyle]:
    """Class decorator: make a style selectable by its ``name``.  The registration order is
    the order error messages list the styles in."""
    _REGISTRY[cls.name] = cls
    return cls


def style_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_style(name: str) -> CPStyle:
    """The registered style ``name``; ``ValueError`` naming the option and the choices."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"context_parallel.style={name!r} is not one of {list(_REGISTRY)}")
    return cls()


class CPStyle(abc.ABC):
    """One context-parallel style (see the module docstring)."""

    name: ClassVar[str]
    needs_cuda: ClassVar[bool] = False
    estimable: ClassVar[bool] = True
    """The CPU memory estimator (fake tensors) can run it."""
    uses_all_to_all: ClassVar[bool] = False
    """This plugin's attention module with an all-to-all (the Ulysses family)."""
    reads_ulysses_degree: ClassVar[bool] = False
    """``context_parallel.ulysses_degree`` chooses the all-to-all group (the hybrids); an
    all-to-all style that does not read it needs it at its default (all ``C`` ranks)."""
    stages_heads: ClassVar[bool] = False
    """``context_parallel.upipe_chunk_heads`` chooses ``U`` (UPipe); an all-to-all style that
    does not read it needs it at 0."""
    builtin_ring: ClassVar[bool] = False
    """Its ring is TorchTitan's DTensor ring attention (all-gather or all-to-all rotation)."""

    @abc.abstractmethod
    def layout(self, cp: int, ulysses_degree: int, chunk_heads: int) -> tuple[int, int]:
        """``(u, U)`` for ``cp`` CP ranks and the options (0 = default)."""

    def check(self, job_config, shape: JobShape, model_args, cuda: bool) -> None:
        """Raise :class:`~.config.ConfigError` for options this style cannot run on the job
        ``shape`` of the model ``model_args``."""

    @abc.abstractmethod
    def sharder(self, groups: CPGroups) -> SequenceSharder | None:
        """How inputs, labels and RoPE positions are sharded; ``None``: TorchTitan's way."""

    @abc.abstractmethod
    def install(self, model: nn.Module, plan: CPPlan, job_config) -> None:
        """Put the style into every attention layer of ``model`` (before AC, compile, FSDP)."""


@register_style
class NoCP(CPStyle):
    """No context parallelism: ``parallelism.context_parallel_degree = 1``."""

    name = "none"

    def layout(self, cp, ulysses_degree, chunk_heads):
        return 1, 0

    def check(self, job_config, shape, model_args, cuda):
        degree = job_config.parallelism.context_parallel_degree
        if degree > 1:
            raise ConfigError(
                f"parallelism.context_parallel_degree={degree} but context_parallel.style='none'; "
                f"choose a style from {[s for s in style_names() if s != 'none']} or set the "
                f"degree to 1"
            )

        attn_type = getattr(model_args, "attn_type", "sdpa")
        if not cuda and attn_type in ("flex", "varlen"):
            raise ConfigError(
                f"model.flavor={job_config.model.flavor!r} uses TorchTitan's attn_type="
                f"{attn_type!r}, which cannot train on a CPU (flex attention has no CPU backward, "
                f"varlen needs CUDA); on a CPU train it with context_parallel.style='ulysses' or "
                f"'upipe' (context_parallel_degree >= 2), which compute its mask themselves"
            )

    def sharder(self, groups):
        return None

    def install(self, model, plan, job_config):
        pass


class AllToAllStyle(CPStyle):
    """The Ulysses family: this plugin's attention module with an all-to-all over ``u`` ranks
    and, when ``u < C``, a zigzag ring over the other ``R = C / u`` (see docs/hybrid.md)."""

    uses_all_to_all = True
    needs_ring: ClassVar[bool] = False
    """``R = C / u`` must exceed 1 (``usp``: with ``u = C`` it would be ``ulysses``)."""

    def layout(self, cp, ulysses_degree, chunk_heads):
        return ulysses_degree or cp, 0

    def strategy(self, plan: CPPlan) -> CPAttentionStrategy:
        """What one attention layer computes between its normed input and ``wo``: the Ulysses
        strategy (its kernel is a ring pass when the groups have a ring)."""
        return UlyssesStrategy(plan.groups, get_kernel(plan.kernel, plan.device))

    def sharder(self, groups):
        return sharder_for(groups)

    def install(self, model, plan, job_config):
        cp = job_config.context_parallel
        for block in model.layers.values():
            timer = AttentionTimer() if cp.time_attention else None
            strategy = self.strategy(plan)
            if strategy.applies_wo:
                check_fusable_wo(block.attention)
            block.attention = ContextParallelAttention(block.attention, strategy, timer)
        check_sharding_once(model, plan.sharder)
        if hasattr(model, "use_local_rope"):  # keep only this rank's RoPE rows (exact, less memory)
            model.use_local_rope(plan.sharder.indices(plan.shape.seq_len))
        kernel = get_kernel(plan.kernel, plan.device).name
        logger.info(
            f"Applied context_parallel.style={cp.style!r} (degree {plan.shape.cp} = all-to-all "
            f"{plan.shape.ulysses} x ring {plan.shape.ring}, kernel {cp.kernel!r} = {kernel!r}) "
            f"to {len(model.layers)} attention layers"
        )

    def check(self, job_config, shape, model_args, cuda):
        cp, seq_len = job_config.context_parallel, shape.seq_len  # padded with pad_seq_len
        degree = job_config.parallelism.context_parallel_degree
        if job_config.validation.enable:
            raise ConfigError(
                f"validation.enable=true is not supported with context_parallel.style={self.name!r} "
                f"yet (TorchTitan's validator shards for its own ring attention); set "
                f"validation.enable=false"
            )
        u = shape.ulysses
        if degree % u != 0:
            raise ConfigError(
                f"context_parallel.ulysses_degree={u} does not divide "
                f"parallelism.context_parallel_degree={degree}; valid: "
                f"{[d for d in range(1, degree + 1) if degree % d == 0]}"
            )
        self._check_ring(shape)
        pad = (f"; or set context_parallel.pad_seq_len=true to pad each sample to "
               f"{padded_length(seq_len, degree, shape.ring)} tokens inside the plugin (the "
               f"padding is kept out of the loss and of every real token's attention)")
        if shape.ring > 1 and seq_len % (2 * degree) != 0:
            raise ConfigError(
                f"training.seq_len={seq_len} must be divisible by 2 * context_parallel_degree = "
                f"{2 * degree} for the ring dimension (zigzag load balancing over {shape.ring} "
                f"ring ranks){pad}"
            )
        if seq_len % degree != 0:
            raise ConfigError(
                f"training.seq_len={seq_len} is not divisible by parallelism.context_parallel_degree="
                f"{degree}; every rank must hold the same number of tokens{pad}"
            )
        _check_mask(job_config, model_args, self.name, shape.ring)
        try:
            shape.rho
        except ValueError as e:
            raise ConfigError(
                f"model {job_config.model.name}/{job_config.model.flavor} cannot use an all-to-all "
                f"over {u} ranks (parallelism.context_parallel_degree={degree}, "
                f"context_parallel.ulysses_degree={cp.ulysses_degree}): {e}"
            ) from None
        self.check_heads(cp, shape)
        try:
            kernel = get_kernel(cp.kernel, "cuda" if cuda else "cpu")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if job_config.compile.enable and cp.time_attention:
            raise ConfigError(
                "compile.enable=true with context_parallel.time_attention=true: the attention timer "
                "breaks fullgraph compilation; set context_parallel.time_attention=false"
            )
        # validated for CUDA on a machine without it, "auto" cannot know the GPU's kernel (on
        # Hopper it is cuDNN): the kernel's own guard refuses an overflowing call then
        if (cuda and kernel.name in ("sdpa", "flash_attn")
                and (cp.kernel != "auto" or torch.cuda.is_available())):
            _check_fa2_offsets(job_config, shape, kernel.name)
        param_dtype = job_config.training.mixed_precision_param
        if cuda and kernel.name != "math" and param_dtype not in ("bfloat16", "float16"):
            raise ConfigError(
                f"context_parallel.kernel={cp.kernel!r} resolves to {kernel.name!r}, a flash kernel "
                f"that takes bfloat16/float16 on CUDA, but training.mixed_precision_param="
                f"{param_dtype!r}; use bfloat16, or kernel='math' for exact float32 attention"
            )

    def _check_ring(self, shape: JobShape) -> None:
        if not self.reads_ulysses_degree and shape.ring > 1:
            raise ConfigError(
                f"context_parallel.style={self.name!r} uses all {shape.cp} CP ranks for the "
                f"all-to-all, but context_parallel.ulysses_degree={shape.ulysses}; for a Ulysses "
                f"x ring hybrid use style='usp' (or 'upipe'), else set ulysses_degree to 0"
            )
        if self.needs_ring and shape.ring == 1:
            raise ConfigError(
                f"context_parallel.style={self.name!r} with ulysses_degree={shape.ulysses} = "
                f"context_parallel_degree leaves a ring of one rank; set "
                f"context_parallel.ulysses_degree to one of "
                f"{[d for d in range(1, shape.cp) if shape.cp % d == 0]} or use style='ulysses'"
            )

    def check_heads(self, cp, shape: JobShape) -> None:
        """Head-count rules beyond the all-to-all's (UPipe's ``U``)."""
        if not self.stages_heads and cp.upipe_chunk_heads:
            raise ConfigError(
                f"context_parallel.upipe_chunk_heads={cp.upipe_chunk_heads} is only used by "
                f"style='upipe' (got style={self.name!r}); leave it at 0"
            )


ATTN_TYPES = ("sdpa", "flex", "varlen")
MASK_TYPES = ("causal", "block_causal")


def documents_of(model_args) -> bool:
    """Whether the model masks attention to packed documents (``block_causal``)."""
    return getattr(model_args, "attn_mask_type", "causal") == "block_causal"


def _check_mask(job_config, model_args, style: str, ring: int) -> None:
    """The flavor's attention type and mask, for a Ulysses-family style: the style computes
    the attention itself (whatever kernel the flavor names), causal or ``block_causal``
    (packed documents, :mod:`~torchtitan_upipe.cp.documents`) when no rank holds a piece of
    the sequence: ``block_causal`` is refused with a ring dimension."""
    flavor = job_config.model.flavor
    attn_type = getattr(model_args, "attn_type", "sdpa")
    mask = getattr(model_args, "attn_mask_type", "causal")
    if attn_type not in ATTN_TYPES:
        raise ConfigError(f"model.flavor={flavor!r} has attn_type={attn_type!r}; "
                          f"context_parallel.style={style!r} takes one of {list(ATTN_TYPES)}")
    if mask not in MASK_TYPES:
        raise ConfigError(f"model.flavor={flavor!r} has attn_mask_type={mask!r}; "
                          f"context_parallel.style={style!r} takes one of {list(MASK_TYPES)}")
    if mask == "block_causal" and ring > 1:
        raise ConfigError(
            f"model.flavor={flavor!r} masks packed documents (attn_mask_type='block_causal'), "
            f"which context_parallel.style={style!r} computes without a ring dimension only, "
            f"but context_parallel.ulysses_degree={job_config.context_parallel.ulysses_degree} "
            f"leaves a ring of {ring}: use style='ulysses' or 'upipe' with ulysses_degree=0 "
            f"(the all-to-all over all CP ranks), or a flavor with attn_mask_type='causal'"
        )
    if mask == "block_causal" and job_config.compile.enable and style != "upipe":
        raise ConfigError(
            f"compile.enable=true with model.flavor={flavor!r} (block_causal): style={style!r} "
            f"runs one kernel call per document inside the compiled block, which fullgraph "
            f"compilation cannot trace; use style='upipe' (its attention is one opaque op) or "
            f"compile.enable=false"
        )


def _check_fa2_offsets(job_config, shape: JobShape, kernel: str) -> None:
    """FlashAttention-2's backward overflows 32-bit offsets past
    :data:`~torchtitan_upipe.cp.kernels.base.FA2_OFFSET_LIMIT`; refuse such a job here, with
    what avoids it, instead of an illegal memory access at its first backward."""
    q_len, heads = shape.attention_call
    d = shape.model.head_dim
    if fa2_backward_offset(q_len, heads, d) < FA2_OFFSET_LIMIT:
        return
    u = shape.ulysses
    safe_u = [c for c in valid_chunk_heads(shape.model.n_heads, u)
              if fa2_backward_offset(q_len, c // u, d) < FA2_OFFSET_LIMIT]
    upipe = (f"style='upipe' with upipe_chunk_heads in {safe_u}" if safe_u
             else "a ring dimension (a smaller ulysses_degree)")
    raise ConfigError(
        f"training.seq_len={shape.seq_len}: context_parallel.kernel={job_config.context_parallel.kernel!r} "
        f"runs FlashAttention-2 ({kernel!r}), whose backward indexes its dQ accumulator in 32-bit "
        f"arithmetic; one call here has {q_len} query tokens x {heads} heads of {d}, "
        f"{fa2_backward_offset(q_len, heads, d)} >= 2^31 = {FA2_OFFSET_LIMIT}. Use "
        f"context_parallel.kernel='cudnn', or {upipe}"
    )


@register_style
class Ulysses(AllToAllStyle):
    """All-to-all from sequence- to head-sharded over all ``C`` ranks, full-sequence causal
    attention on ``H/C`` heads, all-to-all back (:func:`~torchtitan_upipe.ulysses_attention`)."""

    name = "ulysses"


@register_style
class UPipe(AllToAllStyle):
    """Ulysses in ``H/U`` stages of ``U`` heads with the projections fused in
    (:func:`~torchtitan_upipe.upipe_attention`); with ``ulysses_degree < C``, UPipe x ring."""

    name = "upipe"
    reads_ulysses_degree = True
    stages_heads = True

    def layout(self, cp, ulysses_degree, chunk_heads):
        u, _ = super().layout(cp, ulysses_degree, chunk_heads)
        return u, resolve_chunk_heads(chunk_heads, u)

    def check_heads(self, cp, shape):
        try:
            shape.schedule
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def strategy(self, plan):
        return UPipeStrategy(plan.groups, plan.kernel, plan.shape.chunk_heads, plan.inline_upipe,
                             plan.fuse_wo)


@register_style
class TorchTitanRing(CPStyle):
    """TorchTitan's built-in ring attention (torch's SDPA ring through DTensor, head-tail load
    balancing).  CUDA only.  TorchTitan 0.2.2 applies ``context_parallel_rotate_method`` only
    in validation; this style applies it in training too."""

    name = "ring"
    needs_cuda = True
    estimable = False
    builtin_ring = True

    def layout(self, cp, ulysses_degree, chunk_heads):
        return 1, 0

    def check(self, job_config, shape, model_args, cuda):
        cp = job_config.context_parallel
        if not cuda:
            raise ConfigError(
                "context_parallel.style='ring' selects TorchTitan's built-in ring attention (torch "
                "SDPA ring), which needs CUDA; this machine has no CUDA device. Valid on CPU: "
                f"{[s for s in style_names() if not get_style(s).needs_cuda]}"
            )
        if cp.kernel not in ("auto", "sdpa"):
            raise ConfigError(
                f"context_parallel.kernel={cp.kernel!r} has no effect with style='ring' (torch's "
                f"SDPA dispatcher picks the kernel); use kernel='auto'"
            )
        attn_type = getattr(model_args, "attn_type", "sdpa")
        if attn_type != "sdpa":
            raise ConfigError(
                f"model.flavor={job_config.model.flavor!r} uses attn_type={attn_type!r}, but "
                f"style='ring' applies TorchTitan's SDPA ring attention; use a flavor with "
                f"attn_type='sdpa', or style='ulysses'/'upipe' for block_causal documents"
            )
        seq_len, degree = job_config.training.seq_len, job_config.parallelism.context_parallel_degree
        if job_config.context_parallel.pad_seq_len:
            raise ConfigError(
                "context_parallel.pad_seq_len=true is not supported with style='ring' (TorchTitan "
                "shards its inputs itself); use style='usp' with ulysses_degree=1, this plugin's "
                "ring, or a training.seq_len divisible by 2 * context_parallel_degree")
        if seq_len % (2 * degree) != 0:
            raise ConfigError(
                f"training.seq_len={seq_len} must be divisible by 2 * context_parallel_degree = "
                f"{2 * degree} for style='ring' (head-tail load balancing)"
            )

    def sharder(self, groups):
        return None

    def install(self, model, plan, job_config):
        from torch.distributed.tensor.experimental._attention import set_rotate_method
        from torchtitan.distributed.context_parallel import apply_cp_to_attention_module

        set_rotate_method(job_config.parallelism.context_parallel_rotate_method)
        apply_cp_to_attention_module(
            [block.attention.inner_attention for block in model.layers.values()],
            plan.cp_mesh, "sdpa",
        )


@register_style
class USP(AllToAllStyle):
    """Ulysses x ring: the all-to-all over ``ulysses_degree`` ranks, then this plugin's zigzag
    ring attention over the other ``C / ulysses_degree`` (``ulysses_degree = 1``: a pure ring)."""

    name = "usp"
    reads_ulysses_degree = True
    needs_ring = True


__all__ = ["AllToAllStyle", "CPStyle", "get_style", "register_style", "style_names"]
