"""Work only where it matters: events a projection does not handle cost it no script call of their own."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis

from read_service.keys import UserKeys
from shared_kernel.contracts.event_log import NewEvent, events_channel
from tessera.catalog.v1.events_pb2 import ProductAdded
from tessera.common.v1.money_pb2 import Money
from tessera.users.v1.user_query_service_pb2 import UserView

from .conftest import EventLog, StartProjector, UserFactory, eventually, script_calls

pytestmark = pytest.mark.integration


def _product() -> NewEvent:
    product_id = str(uuid.uuid4())
    payload = ProductAdded(
        product_id=product_id,
        sku=f"SKU-{product_id[:8]}",
        name="Lamp",
        price=Money(currency_code="EUR", amount_minor=1),
    )
    return NewEvent(payload, "product", product_id, 1, datetime.now(UTC))


async def test_events_the_projection_ignores_ride_along_with_its_writes(
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
        first_id, first = users.register("first@example.com", "first")
        second_id, second = users.register("second@example.com", "second")
        # A user, twenty product events the users projection does not handle, a user, ten more.
        stream = [first, *(_product() for _ in range(20)), second, *(_product() for _ in range(10))]
        envelopes = await event_log.append(*stream)
        # Published back to back, as the relay does with a backlog: the projector takes them as batches.
        async with redis_client.pipeline(transaction=False) as pipe:
            for envelope in envelopes:
                pipe.publish(events_channel(redis_prefix), envelope.SerializeToString())
            await pipe.execute()
        # The trailing ten move the checkpoint in a marker at the end of a batch or once the stream is quiet.
        await eventually(lambda: projector.checkpoint == 32, message=f"stuck at {projector.checkpoint}")
        for user_id in (first_id, second_id):
            assert await redis_client.get(keys.view(user_id)) is not None
        raw = await redis_client.get(keys.view(second_id))
        assert isinstance(raw, bytes) and UserView.FromString(raw).username == "second"
        assert await redis_client.get(keys.checkpoint) == b"32"
        # Two events write; thirty only move the checkpoint. One call per event was 32 calls.
        # How the 32 split into batches depends on timing, so the bound is a call per batch
        # holding a user (at most two) and one marker.
        await eventually(lambda: len(calls) >= 1)
        assert 1 <= len(calls) <= 3, calls


async def test_a_trickle_of_ignored_events_shares_one_marker_instead_of_one_call_each(
    event_log: EventLog,
    start_projector: StartProjector,
    redis_server_url: str,
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    keys = UserKeys(redis_prefix)
    projector = await start_projector()
    await eventually(lambda: projector.ready)
    async with script_calls(redis_server_url, keys.checkpoint) as calls:
        envelopes = await event_log.append(*(_product() for _ in range(20)))
        for envelope in envelopes:
            # One at a time, each taken by the projector before the next is published: its inbox
            # drains after every event, as it does at a steady trickle from the relay.
            await redis_client.publish(events_channel(redis_prefix), envelope.SerializeToString())
            deadline = asyncio.get_running_loop().time() + 10
            while projector.status().seen < envelope.position:
                assert asyncio.get_running_loop().time() < deadline, f"event {envelope.position} not taken"
                await asyncio.sleep(0.001)
        await eventually(lambda: projector.checkpoint == 20, message=f"stuck at {projector.checkpoint}")
        assert await redis_client.get(keys.checkpoint) == b"20"
        await eventually(lambda: len(calls) >= 1)
        # Written as soon as the inbox drained, each event was a marker call of its own: 20.
        assert len(calls) <= 5, calls
