"""Developer stack: embedded Postgres and Redis, a process supervisor and a gRPC health probe.

Import from the submodules (`devstack.servers`, `devstack.supervisor`, `shared_kernel.platform.healthcheck`):
this package stays import-light so the container health probe starts fast.
"""
