"""Benchmarks (``verispec bench NAME``). Results: JSON (and PNG plots) in bench/results/."""
