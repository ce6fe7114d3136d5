"""Measurement tools that nothing in the training path imports: the CPU memory estimator
(:mod:`.estimate`), the dispatcher-level byte counter (:mod:`.memtrack`) and the performance
models (:mod:`.perf_model`)."""
