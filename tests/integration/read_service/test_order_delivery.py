"""Catalog, orders and users projections under duplicate delivery and gap catch-up, in real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from read_service.keys import CatalogKeys, OrderKeys, UserKeys
from read_service.projections.base import Projection
from read_service.projections.catalog import CatalogProjection
from read_service.projections.orders import OrdersProjection
from read_service.projections.users import UsersProjection
from read_service.projector import Projector

from .conftest import EventLog, Publisher, dump_keyspace, eventually, make_projector
from .test_order_views import World

pytestmark = pytest.mark.integration

PROJECTIONS: list[Callable[[str], Projection]] = [
    lambda prefix: UsersProjection(UserKeys(prefix)),
    lambda prefix: CatalogProjection(CatalogKeys(prefix)),
    lambda prefix: OrdersProjection(OrderKeys(prefix)),
]


@pytest.fixture
async def projectors(
    redis_server_url: str, db_pool: asyncpg.Pool[Any], redis_client: aioredis.Redis
) -> AsyncIterator[Callable[[str], list[Projector]]]:
    """Start the three projections under a prefix (each with its own client); stop them after the test."""
    started: list[tuple[Projector, aioredis.Redis]] = []

    def start(prefix: str) -> list[Projector]:
        group = []
        for make in PROJECTIONS:
            client = aioredis.Redis.from_url(redis_server_url, socket_timeout=5)
            projector = make_projector(client, db_pool, make(prefix), prefix, backoff_initial_s=0.05, backoff_max_s=0.5)
            projector.start()
            started.append((projector, client))
            group.append(projector)
        return group

    yield start
    for projector, client in reversed(started):
        await projector.stop()
        await client.aclose()


async def test_live_duplicates_and_gaps_build_the_same_views_as_a_catch_up(
    projectors: Callable[[str], list[Projector]],
    event_log: EventLog,
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    twice, gappy, replayed = f"{redis_prefix}twice:", f"{redis_prefix}gappy:", f"{redis_prefix}replay:"
    live_twice = projectors(twice)
    live_gappy = projectors(gappy)
    await eventually(lambda: all(p.ready for p in live_twice + live_gappy), message="projectors not ready")

    startup_catch_ups = sum(p.status().catch_ups for p in live_gappy)
    world = World()
    world.build()
    envelopes = await event_log.append(*world.log)
    duplicates = Publisher(redis_client, twice)
    lossy = Publisher(redis_client, gappy)
    for index, envelope in enumerate(envelopes):
        # Every event twice on one prefix (a relay re-publish); every third one lost on the other.
        await duplicates.event(envelope)
        await duplicates.event(envelope)
        if index % 3 != 1:
            await lossy.event(envelope)
    head = envelopes[-1].position
    await lossy.head(head)
    await eventually(
        lambda: all(p.checkpoint == head for p in live_twice + live_gappy), message="live projectors fell behind"
    )
    assert sum(p.status().duplicates for p in live_twice) >= len(envelopes)
    assert sum(p.status().catch_ups for p in live_gappy) > startup_catch_ups  # the gaps were filled from the log

    from_log = projectors(replayed)
    await eventually(lambda: all(p.ready and p.checkpoint == head for p in from_log), message="catch-up failed")

    reference = await dump_keyspace(redis_client, replayed)
    assert reference  # the views exist: the comparison below is not between two empty key spaces
    assert any(name.startswith("orders:stats:") for name in reference)
    assert await dump_keyspace(redis_client, twice) == reference
    assert await dump_keyspace(redis_client, gappy) == reference
