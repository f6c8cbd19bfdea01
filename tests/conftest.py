"""Fixtures shared by every test tier: a fresh database and a private Redis key space per run.

TEST_DATABASE_URL (an admin DSN) and TEST_REDIS_URL point at servers to use; when they
are unset the session starts its own embedded Postgres and Redis on free ports.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis.asyncio as aioredis
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from shared_kernel.platform import migrations

# Every service process runs an SDK TracerProvider (shared_kernel.platform.telemetry), exporting nowhere
# unless told to. The test process does too, from the start: otherwise whether in-process code
# creates real spans would depend on whether an earlier test happened to install a provider.
trace.set_tracer_provider(TracerProvider())


def _with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """DSN of a Postgres server on which the tests may create databases."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    from devstack.servers import EmbeddedPostgres

    with EmbeddedPostgres() as server:
        yield server.url


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    """URL of a Redis server the tests may use (always within their own key prefixes)."""
    url = os.environ.get("TEST_REDIS_URL")
    if url:
        yield url
        return
    from devstack.servers import EmbeddedRedis

    with EmbeddedRedis() as server:
        yield server.url


async def create_database(admin_url: str, migrate: bool = True) -> str:
    """Create a uniquely named, migrated database and return its DSN."""
    name = f"tessera_test_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = _with_database(admin_url, name)
    if migrate:
        conn = await asyncpg.connect(url)
        try:
            await migrations.apply(conn)
        finally:
            await conn.close()
    return url


async def drop_database(admin_url: str, url: str) -> None:
    """Drop a database made by create_database, disconnecting stragglers first."""
    name = urlsplit(url).path.lstrip("/")
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def database_url(postgres_admin_url: str) -> AsyncIterator[str]:
    """A fresh, migrated database for one test."""
    url = await create_database(postgres_admin_url)
    try:
        yield url
    finally:
        await drop_database(postgres_admin_url, url)


@pytest.fixture
async def db_pool(database_url: str) -> AsyncIterator[asyncpg.Pool[Any]]:
    """A pool on the test's fresh database."""
    pool: asyncpg.Pool[Any] = await asyncpg.create_pool(database_url, min_size=1, max_size=10)
    try:
        yield pool
    finally:
        await asyncio.wait_for(pool.close(), 10)


@pytest.fixture
def redis_prefix() -> str:
    """A key and channel prefix no other test uses."""
    return f"test:{secrets.token_hex(6)}:"


@pytest.fixture
async def redis_client(redis_server_url: str, redis_prefix: str) -> AsyncIterator[aioredis.Redis]:
    """A client on the shared test Redis; the test's keys are deleted afterwards."""
    client = aioredis.Redis.from_url(redis_server_url)
    try:
        yield client
    finally:
        keys = [k async for k in client.scan_iter(match=f"{redis_prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()
