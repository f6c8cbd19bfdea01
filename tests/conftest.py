"""Fixtures shared by every test tier: a fresh database and a private Redis key space per run.

TEST_DATABASE_URL (an admin DSN) and TEST_REDIS_URL point at servers to use; when they
are unset the session starts its own embedded Postgres and Redis on free ports.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
import redis as sync_redis
import redis.asyncio as aioredis
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from devstack import servers
from devstack.databases import throwaway_database

# Every service process runs an SDK TracerProvider (shared_kernel.platform.telemetry), exporting nowhere
# unless told to. The test process does too, from the start: otherwise whether in-process code
# creates real spans would depend on whether an earlier test happened to install a provider.
trace.set_tracer_provider(TracerProvider())


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """DSN of a Postgres server on which the tests may create databases."""
    with servers.postgres_admin_url("TEST_DATABASE_URL") as url:
        yield url


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    """URL of a Redis server the tests may use (always within their own key prefixes)."""
    with servers.redis_server_url("TEST_REDIS_URL") as url:
        yield url


@pytest.fixture
async def database_url(postgres_admin_url: str) -> AsyncIterator[str]:
    """A fresh, migrated database for one test."""
    async with throwaway_database(postgres_admin_url) as url:
        yield url


@pytest.fixture
async def db_pool(database_url: str) -> AsyncIterator[asyncpg.Pool[Any]]:
    """A pool on the test's fresh database."""
    pool: asyncpg.Pool[Any] = await asyncpg.create_pool(database_url, min_size=1, max_size=10)
    try:
        yield pool
    finally:
        await asyncio.wait_for(pool.close(), 10)


@pytest.fixture
def redis_prefix(redis_server_url: str) -> Iterator[str]:
    """A key and channel prefix no other test uses; its keys are deleted after the test.

    Deleted here rather than by `redis_client`: this fixture is torn down after every fixture
    that uses the prefix (a projector, a relay, a server process), so nothing writes under it
    once it has been cleared.
    """
    prefix = f"test:{secrets.token_hex(6)}:"
    yield prefix
    with sync_redis.Redis.from_url(redis_server_url) as client:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])


@pytest.fixture
async def redis_client(redis_server_url: str, redis_prefix: str) -> AsyncIterator[aioredis.Redis]:
    """A client on the shared test Redis (the prefix's keys are deleted by `redis_prefix`)."""
    client = aioredis.Redis.from_url(redis_server_url)
    try:
        yield client
    finally:
        await client.aclose()
