"""The active relay announces its head on the head channel, and NOTIFY wakes it without polling."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis

from relay.outbox import published_head
from relay.runner import Role
from shared_kernel.contracts.event_log import events_channel, head_channel
from tessera.events.v1.envelope_pb2 import EventEnvelope, StreamHead
from tests.integration.relay.conftest import RelayHarness
from tests.integration.relay.support import ChannelRecorder, insert_events, wait_until

pytestmark = pytest.mark.integration


async def test_heartbeat_carries_the_published_head(
    relays: RelayHarness, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    # One subscription to both channels shows the order in which Redis sent them.
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(events_channel(redis_prefix), head_channel(redis_prefix))
    try:
        relay = relays.make(relay_heartbeat_interval_s=0.1)
        relays.start(relay)
        seen: list[tuple[str, int]] = []

        async def read_until_head(position: int) -> None:
            while ("head", position) not in seen:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is None:
                    continue
                if message["channel"].decode() == head_channel(redis_prefix):
                    head = StreamHead.FromString(message["data"])
                    assert abs(datetime.now(UTC) - head.sent_at.ToDatetime(tzinfo=UTC)) < timedelta(seconds=30)
                    seen.append(("head", head.position))
                else:
                    seen.append(("event", EventEnvelope.FromString(message["data"]).position))

        async with asyncio.timeout(20):
            await read_until_head(0)
            await insert_events(relays.pool, "a", 5)
            await read_until_head(5)

        # Heads never decrease and never run ahead of the events already sent.
        events_so_far = 0
        last_head = 0
        for kind, position in seen:
            if kind == "event":
                events_so_far = max(events_so_far, position)
            else:
                assert last_head <= position <= events_so_far
                last_head = position
    finally:
        await pubsub.aclose()


async def test_a_standby_sends_no_heartbeat(relays: RelayHarness, heads: ChannelRecorder[StreamHead]) -> None:
    # Another session holds the lock, so this relay can only stand by.
    async with relays.pool.acquire() as holder:
        assert await holder.fetchval("SELECT pg_try_advisory_lock($1)", relays.settings.relay_lock_key)
        standby = relays.make(relay_heartbeat_interval_s=0.05)
        relays.start(standby)
        await wait_until(lambda: standby.role is Role.STANDBY, 10, "the relay to stand by")
        # Ten heartbeat intervals go by without one.
        with pytest.raises(AssertionError, match="timed out"):
            await heads.wait_for(lambda m: len(m) >= 1, timeout=0.5)
        assert standby.role is Role.STANDBY
        await holder.execute("SELECT pg_advisory_unlock($1)", relays.settings.relay_lock_key)
    await wait_until(lambda: standby.role is Role.ACTIVE, 10, "the relay to take the lock")
    await heads.wait_for(lambda m: len(m) >= 1, what="a heartbeat once active")


async def test_notify_wakes_the_relay_between_polls(
    relays: RelayHarness, published: ChannelRecorder[EventEnvelope]
) -> None:
    # A poll interval far longer than the wait below: only NOTIFY can deliver in time.
    relay = relays.make(relay_poll_interval_s=120)
    relays.start(relay)
    await wait_until(lambda: relay.role is Role.ACTIVE, 10, "the relay to become active")
    for count in (1, 2, 3):
        await insert_events(relays.pool, "a", 1)
        await published.wait_for(_has(count), timeout=5, what=f"event {count}")


def _has(count: int) -> Callable[[list[EventEnvelope]], bool]:
    return lambda messages: len(messages) == count


async def test_a_database_without_the_relay_state_row_is_refused_when_leading_starts(db_pool) -> None:
    async with db_pool.acquire() as conn:
        assert await published_head(conn) == 0
        await conn.execute("DELETE FROM relay_state")
        with pytest.raises(RuntimeError, match="were the migrations applied"):
            await published_head(conn)
