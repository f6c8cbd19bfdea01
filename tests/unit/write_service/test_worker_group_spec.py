"""What `python -m write_service` hands its workers when WRITE_WORKERS is above 1."""

from __future__ import annotations

import pytest

from write_service.__main__ import group_spec
from write_service.settings import WriteServiceSettings


@pytest.mark.parametrize(
    ("workers", "max_concurrent", "each"),
    [(2, 4, "2"), (3, 4, "1"), (4, 2, "1"), (2, 5, "2")],
)
def test_workers_share_the_hashing_bound_with_at_least_one_each(workers: int, max_concurrent: int, each: str):
    settings = WriteServiceSettings(write_workers=workers, argon2_max_concurrent=max_concurrent)
    spec = group_spec(settings)
    assert spec.env["ARGON2_MAX_CONCURRENT"] == each
    assert (spec.workers, spec.module, spec.env_prefix) == (workers, "write_service", "WRITE")


def test_each_worker_listens_on_the_group_port_and_drains_within_the_grace_period():
    settings = WriteServiceSettings(write_workers=2, grpc_port=0, grpc_shutdown_grace_s=3.5)
    spec = group_spec(settings)
    assert (spec.port, spec.shutdown_grace_s) == (0, 3.5)
