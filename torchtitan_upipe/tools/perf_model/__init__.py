"""Performance models of a job: communication (:mod:`.comm`) and the affine fit over the
layer count that carries few-layer measurements to full depth (:mod:`.fit`).  The per-rank
memory model is :mod:`torchtitan_upipe.titan.memory_model` (the trainer's config-time
``upipe_chunk_heads = "auto"`` uses it)."""
