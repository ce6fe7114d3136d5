"""Benchmarks, outside the installed package (they need the checkout: train.py and the
configs): run one rank of an N-GPU job per setting (:mod:`.runner`, :mod:`.sweep`), resolve
what each run measured (:mod:`.settings`), carry it to full depth and find the maximum
contexts (:mod:`.analysis`), and render markdown (:mod:`.render`, :mod:`.report`), memory
tables (:mod:`.memory_table`) and plots (:mod:`.plots`) next to the paper's figures
(:mod:`.paper`).  ``scripts/`` holds their commands."""
