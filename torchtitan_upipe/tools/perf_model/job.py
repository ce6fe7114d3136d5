"""What the performance models read of a job given as train.py's options.

The models take the job's :class:`~...titan.shape.JobShape` (built by
:meth:`~...titan.shape.JobShape.from_job_config`, as the trainer builds it) plus the element
sizes and options they depend on: :func:`memory_setup` gives the analytic memory model's
:class:`~.memory.Setup` (precision and the ``[memory]`` stack); the communication model's
:class:`~.comm.CommJob` takes a shape and element sizes directly (``benchmarks/`` builds it
for each measured setting).
"""

from __future__ import annotations

from ...titan.shape import JobShape
from .memory import Setup


def element_bytes(dtype_name: str) -> int:
    """Bytes of a ``training.mixed_precision_*`` element: 4 for float32, else 2."""
    return 4 if dtype_name == "float32" else 2


def memory_setup(job_config, world: int, model_args=None) -> Setup:
    """The memory model of ``job_config`` on ``world`` ranks (``benchmark.n_layers`` limits
    the depth)."""
    mem, tr = job_config.memory, job_config.training
    e = element_bytes(tr.mixed_precision_param)
    return Setup(
        JobShape.from_job_config(job_config, world, model_args),
        param_bytes=e, reduce_bytes=element_bytes(tr.mixed_precision_reduce), act_bytes=e,
        offload=mem.offload_activations, keep_layers=mem.offload_keep_layers,
        offload_prefetch=mem.offload_prefetch, tiled_mlp=mem.tiled_mlp, mlp_tiles=mem.mlp_tiles,
        tiled_norm=mem.tiled_norm, norm_tiles=mem.norm_tiles, chunked_loss=mem.chunked_loss,
    )
