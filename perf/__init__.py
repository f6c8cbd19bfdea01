"""Benchmarks, load tests and measurements of the project, behind one CLI: `python -m perf`."""
