"""Benchmarks (``verispec bench NAME``). Results: JSON (and PNG plots) in --out / --out-dir, else
$VERISPEC_RESULTS, else ./bench-results of the current directory (bench/common.py results_dir);
the project's committed results in bench/results/ are written with VERISPEC_RESULTS=bench/results."""
