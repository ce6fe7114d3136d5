"""The ``[context_parallel]``, ``[memory]`` and ``[benchmark]`` config sections, and
``checkpoint.on_schedule_change`` in TorchTitan's ``[checkpoint]``.

TOML configs name this module (``[job] custom_config_module = "torchtitan_upipe.config"``);
the sections are defined in :mod:`torchtitan_upipe.titan.config`.
"""

from .titan.config import Benchmark, Checkpoint, ContextParallel, JobConfig, Memory

__all__ = ["Benchmark", "Checkpoint", "ContextParallel", "JobConfig", "Memory"]
