"""Upcasting on every path: UserRegistered as version 1 (old code) and version 2 project to the same view.

Version 1 events are inserted into the outbox as the code before decision 0030 wrote them (the
name in `full_name`, schema version 1); version 2 events as the write side writes them now.
Each path that projects an event (live apply, catch-up from the log, a rebuild, a watch's
replay from the log) must give both the same view, and a version this code does not know is
still parked, never guessed at.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from read_service.generations import keyspace_prefix
from read_service.keys import UserKeys
from read_service.projections.users import UsersProjection
from read_service.projector import ParkingMode
from read_service.rebuild import ProjectionSpec, rebuild
from read_service.watch import Watches, WatchLimiter
from shared_kernel.contracts.event_log import NewEvent
from tessera.users.v1.events_pb2 import UserRegistered
from tessera.users.v1.user_query_service_pb2 import UserView

from .conftest import EventLog, Publisher, StartProjector, eventually
from .test_watch import Follower, feed_for, running

pytestmark = pytest.mark.integration

NAME = "Ada Lovelace"
AT = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def _registered(schema_version: int, user_id: str | None = None) -> tuple[str, NewEvent]:
    """UserRegistered for a new user named NAME, written as `schema_version` writes it."""
    user_id = user_id or str(uuid.uuid4())
    payload = UserRegistered(user_id=user_id, email=f"{user_id[:8]}@example.com", username=f"u{user_id[:8]}")
    if schema_version == 1:
        payload.full_name = NAME
    else:
        payload.display_name = NAME
    payload.registered_at.FromDatetime(AT)
    return user_id, NewEvent(payload, "user", user_id, 1, AT, schema_version=schema_version)


def _pair() -> tuple[dict[int, str], list[NewEvent]]:
    """One user registered as version 1 and one as version 2: their ids by version, and the events."""
    old_id, old = _registered(1)
    new_id, new = _registered(2)
    return {1: old_id, 2: new_id}, [old, new]


async def _view(client: aioredis.Redis, keys: UserKeys, user_id: str) -> UserView | None:
    raw = await client.get(keys.view(user_id))
    return None if raw is None else UserView.FromString(raw if isinstance(raw, bytes) else raw.encode())


def _same_but_for_the_user(views: dict[int, UserView | None], ids: dict[int, str]) -> None:
    """The version 1 and version 2 users' views are equal once ids, e-mail and username are set aside."""
    normalized = []
    for version, view in views.items():
        assert view is not None, f"no view for the version {version} user"
        assert view.full_name == NAME
        assert view.user_id == ids[version]
        copy = UserView()
        copy.CopyFrom(view)
        copy.ClearField("user_id")
        copy.ClearField("email")
        copy.ClearField("username")
        normalized.append(copy)
    assert normalized[0] == normalized[1]


async def _both_views(client: aioredis.Redis, keys: UserKeys, ids: dict[int, str]) -> None:
    _same_but_for_the_user({v: await _view(client, keys, user_id) for v, user_id in ids.items()}, ids)


async def test_live_apply_reads_version_1_as_version_2(
    event_log: EventLog,
    publisher: Publisher,
    start_projector: StartProjector,
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    projector = await start_projector()
    await eventually(lambda: projector.ready)
    ids, events = _pair()
    for envelope in await event_log.append(*events):
        assert envelope.schema_version in (1, 2)
        await publisher.event(envelope)
    await eventually(lambda: projector.checkpoint == 2)
    assert projector.parked is None
    await _both_views(redis_client, UserKeys(redis_prefix), ids)


async def test_catch_up_from_the_log_reads_version_1_as_version_2(
    event_log: EventLog, start_projector: StartProjector, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    ids, events = _pair()
    # Only in the log: the projector reads them while catching up, never from pub/sub.
    await event_log.append(*events)
    projector = await start_projector()
    await eventually(lambda: projector.ready and projector.checkpoint == 2)
    assert projector.parked is None
    await _both_views(redis_client, UserKeys(redis_prefix), ids)


async def test_a_rebuild_reads_version_1_as_version_2(
    event_log: EventLog, db_pool: asyncpg.Pool[Any], redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    ids, events = _pair()
    await event_log.append(*events)
    spec = ProjectionSpec("users", UsersProjection.version, lambda p: UsersProjection(UserKeys(p)))
    result = await rebuild(redis_client, db_pool, redis_prefix, spec, batch_size=64, grace_s=0.5, stream=io.StringIO())
    assert (result.events, result.checkpoint) == (2, 2)
    keys = UserKeys(keyspace_prefix(redis_prefix, "users", result.generation))
    await _both_views(redis_client, keys, ids)


async def test_a_watch_replaying_from_the_log_reads_version_1_as_version_2(
    event_log: EventLog,
    publisher: Publisher,
    start_projector: StartProjector,
    redis_client: aioredis.Redis,
    redis_prefix: str,
    db_pool: asyncpg.Pool[Any],
) -> None:
    projector = await start_projector()
    # A replica that applies nothing: every change its watches see is replayed from the log.
    follower = feed_for(Follower(projector), redis_prefix, redis_client, db_pool)
    await eventually(lambda: projector.ready)
    ids, events = _pair()
    keys = UserKeys(redis_prefix)
    async with running(follower):
        await eventually(lambda: follower.released is not None)
        streams = {v: Watches(follower, WatchLimiter(2)).one(keys.view(user_id)) for v, user_id in ids.items()}
        for stream in streams.values():
            assert (await anext(stream)).value is None
        for envelope in await event_log.append(*events):
            await publisher.event(envelope)
        watched: dict[int, UserView | None] = {}
        for version, stream in streams.items():
            change = await asyncio.wait_for(anext(stream), 10)
            assert change.value is not None
            watched[version] = UserView.FromString(change.value)
            await stream.aclose()
        assert follower.replayed == 2
    _same_but_for_the_user(watched, ids)
    # And the replayed values are the ones the applying projector wrote.
    await _both_views(redis_client, keys, ids)
    for version, user_id in ids.items():
        assert watched[version] == await _view(redis_client, keys, user_id)


# (The outbox refuses a version below 1: a CHECK constraint.)
@pytest.mark.parametrize("schema_version", [3, 99])
async def test_a_version_this_code_does_not_know_is_parked(
    event_log: EventLog,
    publisher: Publisher,
    start_projector: StartProjector,
    redis_client: aioredis.Redis,
    redis_prefix: str,
    schema_version: int,
) -> None:
    # Projection parking, so that the park is the projection's (aggregate parking: decision 0029).
    projector = await start_projector(parking=ParkingMode.PROJECTION)
    await eventually(lambda: projector.ready)
    ids, events = _pair()
    _, unknown = _registered(schema_version)
    for envelope in await event_log.append(*events, unknown):
        await publisher.event(envelope)
    await eventually(lambda: projector.parked is not None)
    assert projector.parked is not None
    assert projector.parked.position == 3
    assert f"schema version {schema_version} is not supported" in projector.parked.error
    assert projector.checkpoint == 2
    await _both_views(redis_client, UserKeys(redis_prefix), ids)
