"""The replica's one subscription under a burst: messages taken from the driver's buffer in bulk, in order."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.utils import HIREDIS_AVAILABLE

from read_service.event_source import EventSource, Inbound, Kind
from read_service.keys import UserKeys
from shared_kernel.contracts.event_log import events_channel, head_channel
from tessera.events.v1.envelope_pb2 import EventEnvelope, StreamHead

from .conftest import EventLog, StartProjector, UserFactory, dump_keyspace, eventually, script_calls

pytestmark = pytest.mark.integration


async def _take(inbox: asyncio.Queue[Inbound], count: int) -> list[Inbound]:
    items = []
    for _ in range(count):
        items.append(await asyncio.wait_for(inbox.get(), 10))
    return items


@pytest.mark.skipif(not HIREDIS_AVAILABLE, reason="bulk reads take whole replies from the hiredis parser")
async def test_a_burst_is_read_in_bulk_in_order_with_heads_where_they_were_published(
    redis_server_url: str, redis_client: aioredis.Redis, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = 0
    original = PubSub.get_message

    async def counted(self: PubSub, *args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(PubSub, "get_message", counted)
    client = aioredis.Redis.from_url(redis_server_url, socket_timeout=5)
    source = EventSource(client, redis_prefix, ping_interval_s=0.2)
    try:
        subscriber = await source.subscribe()
        reads = 0
        # 300 events with a head after every 100th, published back to back as a relay does.
        async with redis_client.pipeline(transaction=False) as pipe:
            for position in range(1, 301):
                envelope = EventEnvelope(event_id=f"e{position}", event_type="t", position=position)
                pipe.publish(events_channel(redis_prefix), envelope.SerializeToString())
                if position % 100 == 0:
                    pipe.publish(head_channel(redis_prefix), StreamHead(position=position).SerializeToString())
            await pipe.execute()
        items = await _take(subscriber.inbox, 303)
        expected = []
        for position in range(1, 301):
            expected.append((Kind.EVENT, position))
            if position % 100 == 0:
                expected.append((Kind.HEAD, position))
        got = [(i.kind, i.head if i.kind is Kind.HEAD else i.envelope.position if i.envelope else -1) for i in items]
        assert got == expected
        # One driver read per message was 303; the rest came out of its buffer.
        assert reads < 303 // 3, reads

        # Idle past the ping interval: the PONG is the driver's to handle, and delivery goes on.
        await asyncio.sleep(0.5)
        await redis_client.publish(
            events_channel(redis_prefix), EventEnvelope(event_id="late", position=301).SerializeToString()
        )
        (late,) = await _take(subscriber.inbox, 1)
        assert late.kind is Kind.EVENT and late.envelope is not None and late.envelope.position == 301
        assert subscriber.inbox.empty()
    finally:
        await source.close()
        await client.aclose()


async def test_a_queued_burst_is_applied_in_few_calls_and_equals_a_rebuild(
    event_log: EventLog,
    users: UserFactory,
    start_projector: StartProjector,
    redis_server_url: str,
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    keys = UserKeys(redis_prefix)
    projector = await start_projector()
    await eventually(lambda: projector.ready)
    async with script_calls(redis_server_url, keys.checkpoint) as calls:
        stream = []
        registered = []
        for n in range(150):
            user_id, event = users.register(f"burst{n}@example.com", f"burst{n}")
            registered.append(user_id)
            stream.append(event)
        stream += [users.update(user_id, f"Renamed {user_id[:4]}") for user_id in registered[::3]]
        stream += [users.deactivate(user_id) for user_id in registered[::7]]
        envelopes = await event_log.append(*stream)
        async with redis_client.pipeline(transaction=False) as pipe:
            for envelope in envelopes:
                pipe.publish(events_channel(redis_prefix), envelope.SerializeToString())
            await pipe.execute()
        last = envelopes[-1].position
        await eventually(lambda: projector.checkpoint == last, message=f"stuck at {projector.checkpoint}")
        await eventually(lambda: len(calls) >= 1)
        # A call per event was 222; a queued burst goes as batches, each split only by call size.
        assert len(calls) <= 30, len(calls)

    # A projector on a key space of its own builds the same views from the log alone.
    rebuilt_prefix = f"{redis_prefix}rebuilt:"
    rebuilt = await start_projector(prefix=rebuilt_prefix)
    await eventually(lambda: rebuilt.ready and rebuilt.checkpoint == last)
    live_views = {
        k: v for k, v in (await dump_keyspace(redis_client, redis_prefix)).items() if not k.startswith("rebuilt:")
    }
    assert live_views == await dump_keyspace(redis_client, rebuilt_prefix)
