"""Near-cache hits at the projector's checkpoint: no Redis call, never behind it, forgotten with the key space."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from read_service.keys import UserKeys
from read_service.near_cache import NearCache
from read_service.projections.users import UsersProjection
from read_service.projector import Projector
from read_service.view_store import QueryCheckpoint
from read_service.views.users import UserViews
from read_service.watch import ChangeFeed
from tessera.users.v1.user_query_service_pb2 import UserView

from .conftest import EventLog, Publisher, StartProjector, UserFactory, eventually

pytestmark = pytest.mark.integration


async def query(
    views: UserViews, cache: NearCache, projector: Projector, user_id: str, *, waited_for_token: bool = False
) -> tuple[UserView | None, int]:
    """What GetUser does after its readiness and token checks: the view and the position it reports."""

    async def one() -> tuple[UserView | None, int]:
        at = QueryCheckpoint(cache.observe(projector.read_checkpoint), memory=not waited_for_token)
        view = await views.get_at(user_id, at)
        return view, at.position

    # Each query in a task of its own, as gRPC runs each call.
    return await asyncio.create_task(one())


@contextlib.asynccontextmanager
async def commands_on(redis_server_url: str, prefix: str, client_name: str | None = None) -> AsyncIterator[list[str]]:
    """Every command Redis runs on `prefix` keys inside the block (MONITOR, up to a marker command).

    With `client_name`, only the commands of connections of that name (CLIENT SETNAME), and
    of the scripts they run: a projector or change feed working on the same keys in the
    background is not the code under test.
    """
    seen: list[str] = []
    monitor_client = aioredis.Redis.from_url(redis_server_url)
    try:
        async with monitor_client.monitor() as monitor:
            yield seen
            marker = f"{prefix}end-of-monitoring"
            async with aioredis.Redis.from_url(redis_server_url) as other:
                await other.get(marker)
                # Asked after the block: the pool keeps the connections it used open.
                named = {c["addr"] for c in await other.client_list() if client_name and c.get("name") == client_name}
            # A script's own commands come from "lua", right after the EVALSHA that ran them.
            sender = ""
            async with asyncio.timeout(10):
                while True:
                    entry = await monitor.next_command()
                    command = str(entry["command"])
                    if marker in command:
                        break
                    if entry["client_type"] != "lua":
                        sender = f"{entry['client_address']}:{entry['client_port']}"
                    if prefix in command and (client_name is None or sender in named):
                        seen.append(command)
    finally:
        await monitor_client.aclose()


async def publish(event_log: EventLog, publisher: Publisher, *events: Any) -> None:
    for envelope in await event_log.append(*events):
        await publisher.event(envelope)


async def test_hits_make_no_redis_call_and_report_the_projectors_checkpoint(
    event_log: EventLog,
    users: UserFactory,
    publisher: Publisher,
    start_projector: StartProjector,
    redis_client: aioredis.Redis,
    redis_server_url: str,
    redis_prefix: str,
    db_pool: asyncpg.Pool[Any],
) -> None:
    projector = await start_projector()
    cache = NearCache("users", 100)
    feed = ChangeFeed(
        projector, UsersProjection(UserKeys(redis_prefix)), redis_client, db_pool, recheck_s=0.05, caches=[cache]
    )
    projector.effect_listeners = (feed.on_effect,)
    views = UserViews(redis_client, UserKeys(redis_prefix), cache=cache)
    await eventually(lambda: projector.ready)
    user_id, registered = users.register("hot@example.com", "hot")
    await publish(event_log, publisher, registered)
    feed.start()
    try:
        await eventually(lambda: projector.checkpoint == 1 and feed.released == 1)
        view, position = await query(views, cache, projector, user_id)  # a miss: fills the cache
        assert view is not None and view.version == 1 and position == 1

        async with commands_on(redis_server_url, redis_prefix) as seen:
            answers = [await query(views, cache, projector, user_id) for _ in range(20)]
        assert seen == []
        assert all(v is not None and v.version == 1 and p == 1 for v, p in answers)
        assert cache.stats().hits == 20

        # A query that waited for a consistency token reads Redis, checkpoint and view together.
        async with commands_on(redis_server_url, redis_prefix) as seen:
            view, position = await query(views, cache, projector, user_id, waited_for_token=True)
        assert view is not None and view.version == 1 and position == 1
        assert any("checkpoint" in command for command in seen) and any(user_id in command for command in seen)
        assert cache.stats().hits == 20

        # A write moves the projector and the feed: the next query reads (and reports) the new state.
        await publish(event_log, publisher, users.update(user_id, "Second"))
        await eventually(lambda: projector.checkpoint == 2 and feed.released == 2)
        view, position = await query(views, cache, projector, user_id)
        assert view is not None and view.version == 2 and position == 2
        view, position = await query(views, cache, projector, user_id)
        assert view is not None and view.version == 2 and position == 2
        assert cache.stats().hits == 21
    finally:
        await feed.close()


async def test_an_entry_is_not_served_while_the_feed_is_behind_the_projector(
    event_log: EventLog,
    users: UserFactory,
    publisher: Publisher,
    start_projector: StartProjector,
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    # No feed at all: the cache stays at position 1 while the projector moves on.
    projector = await start_projector()
    cache = NearCache("users", 100)
    views = UserViews(redis_client, UserKeys(redis_prefix), cache=cache)
    await eventually(lambda: projector.ready)
    user_id, registered = users.register("behind@example.com", "behind")
    await publish(event_log, publisher, registered)
    await eventually(lambda: projector.checkpoint == 1)
    cache.reset(1)
    await query(views, cache, projector, user_id)
    view, position = await query(views, cache, projector, user_id)
    assert view is not None and view.version == 1 and position == 1 and cache.stats().hits == 1

    await publish(event_log, publisher, users.update(user_id, "Second"))
    await eventually(lambda: projector.checkpoint == 2)
    view, position = await query(views, cache, projector, user_id)
    assert view is not None and view.version == 2 and position == 2
    assert cache.stats().hits == 1 and cache.stats().behind == 1


async def test_losing_the_views_makes_the_cache_forget_them_at_once(
    event_log: EventLog,
    users: UserFactory,
    publisher: Publisher,
    start_projector: StartProjector,
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    # No feed: only the projector's own notice can empty the cache.
    projector = await start_projector(ping_interval_s=0.2)
    cache = NearCache("users", 100)
    views = UserViews(redis_client, UserKeys(redis_prefix), cache=cache)
    await eventually(lambda: projector.ready)
    user_id, registered = users.register("forgotten@example.com", "forgotten")
    await publish(event_log, publisher, registered)
    await eventually(lambda: projector.checkpoint == 1)
    cache.reset(1)
    await query(views, cache, projector, user_id)
    assert cache.stats().size == 1

    # The views and the checkpoint vanish (a flush); the projector notices and stops serving.
    keys = [k async for k in redis_client.scan_iter(match=f"{redis_prefix}users:*")]
    await redis_client.delete(*keys)
    await publish(event_log, publisher, users.update(user_id, "After"))
    await eventually(lambda: not projector.ready or cache.stats().size == 0, timeout=15)
    assert cache.stats().size == 0
    assert cache.stats().resets >= 2  # the reset above, then the projector's
