"""A replica paused (SIGSTOP) until Redis cuts its subscription off catches up by itself after SIGCONT."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from devstack.servers import EmbeddedRedis
from devstack.supervisor import Stack, one_replica_config
from shared_kernel.contracts.event_log import events_channel, head_channel
from shared_kernel.platform.healthcheck import check_serving_async
from tessera.events.v1.envelope_pb2 import StreamHead
from tessera_client import TesseraClient
from tests.e2e.conftest import FAST_HASHING
from tests.e2e.test_redis_loss import wait_all_present

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

# Redis drops a pub/sub client once 64 kB wait for it for a second (or 256 kB at once).
SMALL_PUBSUB_BUFFER = ("--client-output-buffer-limit", "pubsub", "256kb", "64kb", "1")
FILLER_BYTES = 65536


def filler() -> bytes:
    """A heartbeat at position 0 (below any checkpoint, so ignored) padded by an unknown field."""
    size = FILLER_BYTES
    varint = bytearray()
    while size >= 0x80:
        varint.append(size & 0x7F | 0x80)
        size >>= 7
    varint.append(size)
    return StreamHead(position=0).SerializeToString() + b"\xc2\x3e" + bytes(varint) + b"f" * FILLER_BYTES


@pytest.fixture(scope="module")
async def pause_stack(e2e_database: str, e2e_logs: Path) -> AsyncIterator[tuple[Stack, EmbeddedRedis]]:
    """A stack with one replica on a Redis of its own with a small pub/sub output buffer."""
    server = await asyncio.to_thread(EmbeddedRedis(extra_args=SMALL_PUBSUB_BUFFER).start)
    config = one_replica_config(e2e_database, server.url, "pause", e2e_logs, env=FAST_HASHING)
    try:
        running = await Stack(config).start_async()
        try:
            yield running, server
        finally:
            await running.stop_async()
    finally:
        await asyncio.to_thread(server.stop)


async def register(address: str, count: int) -> list[str]:
    async with TesseraClient(address, None, timeout=30.0) as client:
        tag = secrets.token_hex(3)
        replies = await asyncio.gather(
            *(
                client.users.register_user(
                    email=f"pause{i}.{tag}@example.com",
                    username=f"pause{i}_{tag}",
                    password="correct horse battery",
                    full_name=f"Paused {i}",
                )
                for i in range(count)
            )
        )
    return [r.user_id for r in replies]


async def subscribers(client: aioredis.Redis, channel: str) -> int:
    reply = await client.pubsub_numsub(channel)
    return int(reply[0][1])


async def test_a_replica_cut_off_while_paused_catches_up_after_sigcont(
    pause_stack: tuple[Stack, EmbeddedRedis],
) -> None:
    stack, server = pause_stack
    prefix = stack.config.redis_key_prefix
    replica = stack.readers[0]
    before = await register(stack.write_address, 10)
    await wait_all_present(replica.address, before, within=30)
    client = aioredis.Redis.from_url(server.url, socket_timeout=5)
    try:
        # One subscription per projector of the replica.
        subscribed = await subscribers(client, events_channel(prefix))
        assert subscribed >= 1
        replica.pause()
        try:
            during = await register(stack.write_address, 20)
            message = filler()
            deadline = time.monotonic() + 60
            # Heartbeat-shaped padding fills the paused replica's output buffer until Redis drops it.
            while await subscribers(client, events_channel(prefix)) > 0:
                assert time.monotonic() < deadline, "Redis did not cut the paused replica off within 60 s"
                for _ in range(16):
                    await client.publish(head_channel(prefix), message)
            cut_off = True
        finally:
            replica.resume()
        assert cut_off
        resumed_at = time.monotonic()
        await wait_all_present(replica.address, before + during, within=30)
        caught_up_s = time.monotonic() - resumed_at
        assert await check_serving_async(replica.address)
        # It subscribed again by itself, so later events arrive live.
        deadline = time.monotonic() + 15
        while await subscribers(client, events_channel(prefix)) < subscribed:
            assert time.monotonic() < deadline, "the replica never subscribed again"
            await asyncio.sleep(0.05)
        after = await register(stack.write_address, 5)
        await wait_all_present(replica.address, after, within=10)
    finally:
        await client.aclose()
    assert caught_up_s < 30
