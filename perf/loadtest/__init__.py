"""Load testing for the read replicas and the write service: seeding, load models, engines, figures and plots.

`python -m devstack.loadtest --help` lists the modes (seed, read, write, lag);
`python -m devstack.loadtest.read_bench` produces the read-side benchmark figures.
"""
