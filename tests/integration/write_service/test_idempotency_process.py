"""The real `python -m write_service` process: keyed retries, and its cleanup task deleting expired keys."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest

from tessera.users.v1 import user_command_service_pb2 as pb
from tessera.users.v1 import user_command_service_pb2_grpc as pb_grpc
from tests.integration.write_service.support import running_write_service
from tests.unit.write_service import helpers

pytestmark = pytest.mark.integration


async def wait_until_gone(pool: asyncpg.Pool[Any], key: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while await pool.fetchval("SELECT count(*) FROM idempotency_keys WHERE idempotency_key = $1", key):
        if time.monotonic() > deadline:
            raise AssertionError("the write service never deleted the expired idempotency key")
        await asyncio.sleep(0.05)


async def test_the_service_replays_retries_and_deletes_expired_keys(database_url, db_pool):
    async with running_write_service(
        database_url, IDEMPOTENCY_CLEANUP_INTERVAL_S="0.1", IDEMPOTENCY_RETENTION_S="3600"
    ) as service:
        stub = pb_grpc.UserCommandServiceStub(service.channel)
        request = pb.RegisterUserRequest(
            email=f"p{helpers.suffix()}@example.com",
            username=f"p{helpers.suffix()}",
            password=helpers.PASSWORD,
            full_name="Process Test",
        )
        expired_key, live_key = helpers.key(), helpers.key()
        first = await stub.RegisterUser(request, metadata=(("idempotency-key", expired_key),), timeout=10)
        again = await stub.RegisterUser(request, metadata=(("idempotency-key", expired_key),), timeout=10)
        assert again == first
        other = pb.RegisterUserRequest(
            email=f"q{helpers.suffix()}@example.com",
            username=f"q{helpers.suffix()}",
            password=helpers.PASSWORD,
            full_name="Process Test",
        )
        await stub.RegisterUser(other, metadata=(("idempotency-key", live_key),), timeout=10)
        [stored] = await db_pool.fetch(
            "SELECT expires_at - created_at AS retention FROM idempotency_keys WHERE idempotency_key = $1",
            live_key,
        )
        assert stored["retention"].total_seconds() == 3600
        await db_pool.execute(
            "UPDATE idempotency_keys SET created_at = now() - interval '2 hours', "
            "expires_at = now() - interval '1 hour' WHERE idempotency_key = $1",
            expired_key,
        )
        await wait_until_gone(db_pool, expired_key)
        assert await db_pool.fetchval("SELECT count(*) FROM idempotency_keys WHERE idempotency_key = $1", live_key)
        returncode, log = await service.terminate()
    assert returncode == 0, log
    assert "deleted expired idempotency keys" in log
    assert "idempotent hit" in log
    assert helpers.PASSWORD not in log
    principals = {r["principal"] for r in await db_pool.fetch("SELECT principal FROM command_log")}
    assert len(principals) == 1
    assert "" not in principals
