"""Benchmarks: one module per question, sharing `benchmarks.harness`. Run from the repository
root as modules, e.g. `python -m benchmarks.bench_unscale`; results go to benchmarks/results/."""
