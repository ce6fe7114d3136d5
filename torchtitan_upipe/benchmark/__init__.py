"""Measuring CP styles like the paper, one simulated rank at a time (see scripts/bench_one_rank.py)."""
