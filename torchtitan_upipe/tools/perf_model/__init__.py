"""Performance models of a job: memory per rank (:mod:`.memory`), communication
(:mod:`.comm`), train.py's options to their inputs (:mod:`.job`), and the affine fit over the
layer count that carries few-layer measurements to full depth (:mod:`.fit`)."""
