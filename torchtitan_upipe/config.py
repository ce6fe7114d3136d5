"""The ``[context_parallel]``, ``[memory]`` and ``[benchmark]`` config sections.

TOML configs name this module (``[job] custom_config_module = "torchtitan_upipe.config"``);
the sections are defined in :mod:`torchtitan_upipe.titan.config`.
"""

from .titan.config import Benchmark, ContextParallel, JobConfig, Memory

__all__ = ["Benchmark", "ContextParallel", "JobConfig", "Memory"]
