"""Opening a Redis client's pooled connections ahead of the first commands."""

from __future__ import annotations

import asyncio
import secrets

import pytest
import redis.asyncio as aioredis

from devstack.servers import find_free_port
from read_service.bootstrap import create_redis_client
from shared_kernel.platform.redis_client import warm_up

pytestmark = pytest.mark.integration


async def _connections_named(observer: aioredis.Redis, name: str) -> set[str]:
    return {str(entry["id"]) for entry in await observer.client_list(_type="normal") if entry.get("name") == name}


async def test_warm_up_opens_connections_that_commands_then_reuse(redis_server_url: str) -> None:
    client = create_redis_client(redis_server_url, 2.0)
    # A name on every connection of this pool tells them apart from other clients of the server.
    name = f"warm-up-{secrets.token_hex(4)}"
    client.connection_pool.connection_kwargs["client_name"] = name
    observer = aioredis.Redis.from_url(redis_server_url)
    try:
        assert await _connections_named(observer, name) == set()
        assert await warm_up(client, 4, 2.0) == 4
        opened = await _connections_named(observer, name)
        assert len(opened) == 4

        await asyncio.gather(*(client.ping() for _ in range(4)))
        # The commands ran on the warmed connections: none was opened for them.
        assert await _connections_named(observer, name) == opened
    finally:
        await client.aclose()
        await observer.aclose()


async def test_warm_up_gives_up_quietly_when_redis_is_down() -> None:
    client = create_redis_client(f"redis://127.0.0.1:{find_free_port()}/0", 0.5)
    try:
        assert await warm_up(client, 4, 1.0) == 0
    finally:
        await client.aclose()
