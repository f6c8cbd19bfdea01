"""A Redis that may evict views is refused at start, and turns a serving replica NOT_SERVING when set at run time.

Each test runs its own throwaway redis-server (the shared one's settings are never touched).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2

from devstack.servers import EmbeddedRedis
from read_service.bootstrap import running_read_service
from read_service.eviction import EvictingRedis, EvictionGuard, is_safe

from .conftest import eventually
from .test_service import free_port, health_status, settings_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.mark.parametrize(
    ("policy", "safe"),
    [
        ("noeviction", True),
        ("volatile-lru", True),
        ("volatile-lfu", True),
        ("volatile-random", True),
        ("volatile-ttl", True),
        ("allkeys-lru", False),
        ("allkeys-lfu", False),
        ("allkeys-random", False),
        ("some-future-policy", False),
    ],
)
def test_only_policies_that_keep_keys_without_a_ttl_are_safe(policy: str, safe: bool) -> None:
    assert is_safe(policy) is safe


async def test_the_service_refuses_to_start_against_an_evicting_redis(
    own_redis: EmbeddedRedis, database_url: str, redis_prefix: str
) -> None:
    own_redis.client().config_set("maxmemory-policy", "allkeys-lru")
    with pytest.raises(EvictingRedis, match="maxmemory-policy 'allkeys-lru'"):
        async with running_read_service(settings_for(database_url, own_redis.url, redis_prefix)):
            pytest.fail("the service started")


async def test_the_process_exits_1_naming_the_setting(
    own_redis: EmbeddedRedis, database_url: str, redis_prefix: str
) -> None:
    own_redis.client().config_set("maxmemory-policy", "allkeys-random")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": database_url,
        "REDIS_URL": own_redis.url,
        "REDIS_KEY_PREFIX": redis_prefix,
        "GRPC_HOST": "127.0.0.1",
        "GRPC_PORT": str(free_port()),
        "PAGE_TOKEN_SECRET": "integration-test-secret-0123456789",
        "AUTH_MODE": "insecure",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "read_service", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 1
    assert b"refused to start" in stderr and b"maxmemory-policy" in stderr and b"allkeys-random" in stderr


async def test_a_policy_changed_at_run_time_turns_the_replica_not_serving_until_changed_back(
    own_redis: EmbeddedRedis, database_url: str, redis_prefix: str
) -> None:
    settings = settings_for(database_url, own_redis.url, redis_prefix).model_copy(update={"redis_policy_check_s": 0.1})
    admin = own_redis.client()
    async with (
        running_read_service(settings) as service,
        grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel,
    ):

        async def status_is(wanted: int) -> bool:
            return bool(await health_status(channel) == wanted)

        await eventually(lambda: status_is(SERVING), message="never SERVING")
        admin.config_set("maxmemory-policy", "allkeys-lfu")
        await eventually(lambda: status_is(NOT_SERVING), message="still SERVING with allkeys-lfu")
        assert await health_status(channel, "tessera.users.v1.UserQueryService") == NOT_SERVING
        admin.config_set("maxmemory-policy", "volatile-lru")
        await eventually(lambda: status_is(SERVING), message="not SERVING again after volatile-lru")


async def test_a_redis_without_config_is_trusted_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    with EmbeddedRedis(extra_args=["--rename-command", "CONFIG", ""]) as server:
        client = aioredis.Redis.from_url(server.url)
        try:
            changes: list[bool] = []

            async def record(safe: bool) -> None:
                changes.append(safe)

            guard = EvictionGuard(client, timeout_s=5, interval_s=0.05, on_change=record)
            with caplog.at_level(logging.WARNING, logger="read_service.eviction"):
                await guard.check()
                task = asyncio.create_task(guard.run())

                async def refused_several_times() -> bool:
                    # Each check is answered "unknown command": count those errors on the server.
                    errors = await client.info("errorstats")
                    return int(errors.get("errorstat_ERR", {}).get("count", 0)) >= 4

                await eventually(refused_several_times, message="the guard did not keep checking")
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
        finally:
            await client.aclose()
    assert guard.safe and changes == []
    warnings = [r for r in caplog.records if "maxmemory-policy" in r.getMessage()]
    assert len(warnings) == 1 and "CONFIG is disabled" in warnings[0].getMessage()
