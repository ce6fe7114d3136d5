"""Context-parallel attention algorithms: torch only (this layer never imports TorchTitan).

* :mod:`.comm` -- the sequence <-> head all-to-all and fused pairs; :mod:`.gqa` -- KV-head
  replication; :mod:`.precision` -- the accumulation-dtype rule.
* :mod:`.kernels` -- attention kernels behind one interface (forward returns the LSE).
* :mod:`.ulysses`, :mod:`.upipe`, :mod:`.ring` (with :mod:`.zigzag`) -- the attention styles.
* :mod:`.documents` -- packed documents; :mod:`.replay` -- an attention result kept from the
  forward and replayed in the recompute.
"""
