"""Performance measurements run on a GPU machine (`python -m benchmarks.perf.gpu_suite`); see docs/performance.md."""
