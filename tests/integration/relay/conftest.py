"""Fixtures for the relay's integration tests: settings, relays that are always shut down, recorders."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from pydantic import PostgresDsn, RedisDsn

from relay.leadership import Connect
from relay.publisher import Publisher, RedisPublisher
from relay.runner import Relay
from relay.settings import RelaySettings
from shared_kernel.contracts.event_log import events_channel, head_channel
from tessera.events.v1.envelope_pb2 import EventEnvelope, StreamHead
from tests.integration.relay.support import ChannelRecorder


@pytest.fixture
def relay_settings(database_url: str, redis_server_url: str, redis_prefix: str) -> RelaySettings:
    """Settings for one test's relays: short intervals so failover and polling are quick."""
    return RelaySettings(
        database_url=PostgresDsn(database_url),
        redis_url=RedisDsn(redis_server_url),
        redis_key_prefix=redis_prefix,
        relay_batch_size=50,
        # Batches keep one size unless a test asks for growth: most tests count batches.
        relay_max_batch_size=50,
        relay_poll_interval_s=0.2,
        relay_heartbeat_interval_s=0.2,
        relay_standby_retry_s=0.1,
        relay_shutdown_grace_s=5.0,
    )


class RelayHarness:
    """Builds relays for a test and makes sure every one is shut down afterwards."""

    def __init__(self, settings: RelaySettings, pool: asyncpg.Pool[Any], redis: aioredis.Redis) -> None:
        self.settings = settings
        self.pool = pool
        self.redis = redis
        self._relays: list[Relay] = []
        self._tasks: list[asyncio.Task[None]] = []

    def real_publisher(self) -> Publisher:
        """A publisher on the test's Redis and key prefix."""
        return RedisPublisher(self.redis, self.settings.redis_key_prefix)

    def make(
        self,
        *,
        publisher: Publisher | None = None,
        connect: Connect | None = None,
        redis: aioredis.Redis | None = None,
        **overrides: Any,
    ) -> Relay:
        """A relay on the test's database and Redis, with settings overridden by keyword.

        A batch size given without a largest batch size is also the largest: the batches
        stay that size.
        """
        if "relay_batch_size" in overrides:
            overrides.setdefault("relay_max_batch_size", overrides["relay_batch_size"])
        settings = self.settings.model_copy(update=overrides)
        relay = Relay(settings, self.pool, redis or self.redis, connect=connect, publisher=publisher)
        self._relays.append(relay)
        return relay

    def start(self, relay: Relay) -> asyncio.Task[None]:
        """Run `relay` in the background."""
        task = asyncio.create_task(relay.run())
        self._tasks.append(task)
        return task

    async def close(self) -> None:
        """Shut every relay down and wait for their tasks."""
        await asyncio.wait_for(asyncio.gather(*(r.shutdown() for r in self._relays)), 30)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=30)
            for task in self._tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise AssertionError("a relay task failed") from task.exception()


@pytest.fixture
async def relays(
    relay_settings: RelaySettings, db_pool: asyncpg.Pool[Any], redis_client: aioredis.Redis
) -> AsyncIterator[RelayHarness]:
    """A harness whose relays are shut down when the test ends."""
    harness = RelayHarness(relay_settings, db_pool, redis_client)
    try:
        yield harness
    finally:
        await harness.close()


@pytest.fixture
async def published(redis_client: aioredis.Redis, redis_prefix: str) -> AsyncIterator[ChannelRecorder[EventEnvelope]]:
    """Every envelope published on the test's events channel."""
    recorder = ChannelRecorder(redis_client, events_channel(redis_prefix), EventEnvelope.FromString)
    await recorder.start()
    try:
        yield recorder
    finally:
        await recorder.close()


@pytest.fixture
async def heads(redis_client: aioredis.Redis, redis_prefix: str) -> AsyncIterator[ChannelRecorder[StreamHead]]:
    """Every StreamHead published on the test's head channel."""
    recorder = ChannelRecorder(redis_client, head_channel(redis_prefix), StreamHead.FromString)
    await recorder.start()
    try:
        yield recorder
    finally:
        await recorder.close()
