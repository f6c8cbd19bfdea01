"""Load testing for the read replicas and the write service: seeding, load models, engines, figures and plots.

`python -m perf loadtest --help` lists the modes (seed, read, write, lag);
`python -m perf read` produces the read-side benchmark figures.
"""
