"""Scripts for the GPU machine and for profiling; Python ones run from the repository root as
modules (`python -m scripts.profile_step`), so they import `benchmarks.harness` as a package."""
