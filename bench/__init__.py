"""Benchmarks: the method comparison (methods.py, `webdistill bench`; its table is
configs/bench_methods.yaml) and the stage benchmarks (bench_*.py, run as scripts)."""
