"""The real stack for end-to-end tests: write service, two relays, two read replicas, the payment
provider and a saga worker as subprocesses on free ports, over a fresh database and a private
Redis key prefix. `stack.provider_address` and `stack.saga_workers` reach the last two."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from devstack.databases import throwaway_database
from devstack.supervisor import Stack, StackConfig
from tessera_client import TesseraClient

# Cheap argon2 parameters keep registration fast in tests; production defaults are in settings.
FAST_HASHING = {
    "ARGON2_TIME_COST": "1",
    "ARGON2_MEMORY_COST_KIB": "1024",
    "ARGON2_PARALLELISM": "1",
    "PAGE_TOKEN_SECRET": "end-to-end-test-page-token-secret",
    "LOG_LEVEL": "INFO",
}


@pytest.fixture(scope="module")
async def e2e_database(postgres_admin_url: str) -> AsyncIterator[str]:
    """A migrated database shared by one test module's stack."""
    async with throwaway_database(postgres_admin_url) as url:
        yield url


@pytest.fixture(scope="module")
def e2e_prefix() -> str:
    """The module's Redis key prefix."""
    return f"e2e:{secrets.token_hex(5)}:"


@pytest.fixture(scope="module")
def e2e_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the services' logs go (printed on failure by the stack's error messages)."""
    return tmp_path_factory.mktemp("stack-logs")


@asynccontextmanager
async def running_stack(config: StackConfig, redis_url: str) -> AsyncIterator[Stack]:
    """Start a stack, yield it, then stop it and delete its Redis keys."""
    running = await Stack(config).start_async()
    try:
        yield running
    finally:
        await running.stop_async()
        client = aioredis.Redis.from_url(redis_url)
        keys = [k async for k in client.scan_iter(match=f"{config.redis_key_prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def e2e_config(database_url: str, redis_url: str, prefix: str, logs: Path, **overrides: Any) -> StackConfig:
    """A stack over the module's database, Redis prefix and log folder; `overrides` set other StackConfig fields."""
    fields: dict[str, Any] = {
        "database_url": database_url,
        "redis_url": redis_url,
        "redis_key_prefix": prefix,
        "log_dir": logs,
        "migrate": False,
        "env": FAST_HASHING,
    }
    return StackConfig(**(fields | overrides))


@pytest.fixture(scope="module")
async def stack(e2e_database: str, redis_server_url: str, e2e_prefix: str, e2e_logs: Path) -> AsyncIterator[Stack]:
    """Write service, two relays and two read replicas, all SERVING; no authentication (AUTH_MODE=insecure)."""
    config = e2e_config(e2e_database, redis_server_url, e2e_prefix, e2e_logs, auth=False)
    async with running_stack(config, redis_server_url) as running:
        yield running


@pytest.fixture(scope="module")
async def auth_stack(e2e_database: str, redis_server_url: str, e2e_prefix: str, e2e_logs: Path) -> AsyncIterator[Stack]:
    """Like `stack`, but every service requires bearer tokens; `auth_stack.auth_metadata(scopes)` makes them."""
    config = e2e_config(e2e_database, redis_server_url, e2e_prefix, e2e_logs, auth=True)
    async with running_stack(config, redis_server_url) as running:
        yield running


@pytest.fixture(scope="module")
async def write_channel(stack: Stack) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the write service."""
    async with grpc.aio.insecure_channel(stack.write_address) as channel:
        yield channel


@pytest.fixture(scope="module")
async def provider_channel(stack: Stack) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the payment provider (PaymentProviderService and PaymentProviderAdminService)."""
    async with grpc.aio.insecure_channel(stack.provider_address) as channel:
        yield channel


@pytest.fixture(scope="module")
async def read_channels(stack: Stack) -> AsyncIterator[list[grpc.aio.Channel]]:
    """One channel per read replica."""
    channels = [grpc.aio.insecure_channel(address) for address in stack.read_addresses]
    try:
        yield channels
    finally:
        for channel in channels:
            await channel.close()


@pytest.fixture(scope="module")
async def tessera(stack: Stack) -> AsyncIterator[TesseraClient]:
    """The client library over the stack: commands to the write service, queries round robin over
    both replicas; no consistency session (a test passes a token when it means to)."""
    async with TesseraClient(stack.write_address, stack.read_addresses, timeout=10, session=False) as client:
        yield client


@pytest.fixture(scope="module")
async def replica_clients(stack: Stack) -> AsyncIterator[list[TesseraClient]]:
    """One client per read replica, whose queries go to that replica alone (a test that checks each
    replica on purpose); no consistency session."""
    clients = [
        TesseraClient(stack.write_address, [address], timeout=10, session=False) for address in stack.read_addresses
    ]
    try:
        yield clients
    finally:
        for client in clients:
            await client.close()


@pytest.fixture
def unique() -> Iterator[str]:
    """A short random token for unique e-mails and usernames."""
    yield secrets.token_hex(4)
