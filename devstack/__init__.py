"""The test and development harness: embedded Postgres and Redis (and a replicated Postgres), the
process supervisor, the stack `make up` and the tests start, a fault-injecting TCP proxy and the
chaos stack (`devstack.chaos`). Benchmarks and load tests live in `perf/`.

Import from the submodules (`devstack.servers`, `devstack.supervisor`, `shared_kernel.platform.healthcheck`):
this package stays import-light so the container health probe starts fast.
"""
