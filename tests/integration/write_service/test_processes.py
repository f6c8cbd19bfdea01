"""The real processes: `python -m write_service.migrate` and `python -m write_service`."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import pytest

from devstack.databases import create_database, drop_database
from tessera.users.v1 import user_command_service_pb2 as pb
from tessera.users.v1 import user_command_service_pb2_grpc as pb_grpc
from tests.integration.write_service.support import ROOT, environment, running_write_service
from tests.unit.write_service import helpers

pytestmark = pytest.mark.integration


async def run_module(module: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return subprocess.CompletedProcess([module], process.returncode, stdout.decode(), stderr.decode())


@pytest.fixture
async def empty_database(postgres_admin_url: str) -> AsyncIterator[str]:
    url = await create_database(postgres_admin_url, migrate=False)
    try:
        yield url
    finally:
        await drop_database(postgres_admin_url, url)


async def test_migrate_applies_once_then_reports_nothing_pending(empty_database):
    first = await run_module("write_service.migrate", environment(DATABASE_URL=empty_database))
    assert first.returncode == 0, first.stderr
    expected = [f"applied {path.stem}" for path in sorted((ROOT / "migrations").glob("*.sql"))]
    assert expected[:4] == [
        "applied 0001_users_outbox_command_log",
        "applied 0002_idempotency_and_audit",
        "applied 0003_email_key",
        "applied 0004_catalog_orders_sagas",
    ]
    assert first.stdout.splitlines() == expected
    second = await run_module("write_service.migrate", environment(DATABASE_URL=empty_database))
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "no pending migrations"


async def test_migrate_gives_up_at_its_deadline():
    started = time.monotonic()
    result = await run_module(
        "write_service.migrate",
        environment(DATABASE_URL="postgresql://postgres@127.0.0.1:1/postgres", MIGRATE_WAIT_S="0.5"),
    )
    assert result.returncode == 1
    assert "migrate failed" in result.stderr
    assert time.monotonic() - started < 30


async def test_the_service_serves_then_stops_cleanly_on_sigterm(database_url):
    async with running_write_service(database_url, LOG_FORMAT="json") as service:
        stub = pb_grpc.UserCommandServiceStub(service.channel)
        reply = await stub.RegisterUser(
            pb.RegisterUserRequest(
                email=f"p{helpers.suffix()}@example.com",
                username=f"p{helpers.suffix()}",
                password=helpers.PASSWORD,
                full_name="Process Test",
            ),
            timeout=10,
        )
        assert reply.version == 1
        returncode, log = await service.terminate()
    assert returncode == 0, log
    assert "write service serving" in log
    assert "shutting down" in log
    assert helpers.PASSWORD not in log
