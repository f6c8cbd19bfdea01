"""The event log going back under the views (a failover onto a standby that lacked the last commits).

The log is rewound the way a promoted asynchronous standby rewinds it: the last positions
and their events vanish, and the positions are handed out again to other events. Replicas
must notice, stop serving, and rebuild so that the views equal the log as it is now.
"""

from __future__ import annotations

import time
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from read_service.generations import pointer_key
from read_service.keys import UserKeys
from read_service.log_guard import Fingerprint, LogRewound, check_log
from read_service.projector import Projector
from shared_kernel.contracts.event_log import read_positioned
from tessera.users.v1.user_query_service_pb2 import UserView

from .conftest import EventLog, Publisher, Replica, UserFactory, eventually

pytestmark = pytest.mark.integration


async def rewind(pool: asyncpg.Pool[Any], to: int) -> None:
    """Make the log end at position `to`, as if the events after it had never been committed."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("DELETE FROM outbox WHERE position > $1", to)
        await conn.execute("UPDATE relay_state SET last_position = $1, published_position = $1", to)


async def view(client: aioredis.Redis, keys: UserKeys, user_id: str) -> UserView | None:
    raw = await client.get(keys.view(user_id))
    return None if raw is None else UserView.FromString(raw if isinstance(raw, bytes) else raw.encode())


async def register(event_log: EventLog, users: UserFactory, count: int, tag: str) -> list[str]:
    """Register `count` users, one event each at the next positions; return their ids."""
    ids, events = [], []
    for index in range(count):
        user_id, event = users.register(f"{tag}{index}@example.com", f"{tag}{index}")
        ids.append(user_id)
        events.append(event)
    await event_log.append(*events)
    return ids


async def test_check_log_accepts_the_log_it_saw_and_names_what_changed(
    event_log: EventLog, users: UserFactory, db_pool: asyncpg.Pool[Any]
) -> None:
    await register(event_log, users, 3, "seen")
    envelopes = await event_log.pool.fetch("SELECT position, event_id::text FROM outbox ORDER BY position")
    third = Fingerprint(3, envelopes[2]["event_id"])

    assert await check_log(db_pool, None) == 3
    assert await check_log(db_pool, third) == 3

    await rewind(db_pool, 2)
    with pytest.raises(LogRewound, match="head is 2, below position 3"):
        await check_log(db_pool, third)

    await register(event_log, users, 1, "other")
    with pytest.raises(LogRewound, match=f"position 3 now holds event .* not {third.event_id}"):
        await check_log(db_pool, third)


def test_fingerprints_round_trip_and_refuse_garbage() -> None:
    print_ = Fingerprint(12, "0b7e4c4e-8f39-4a57-9d0e-3c1a7b1e2f10")
    assert Fingerprint.decode(print_.encode()) == print_
    assert Fingerprint.decode(print_.encode().encode()) == print_
    for garbage in (None, "", "12", ":abc", "x:abc"):
        assert Fingerprint.decode(garbage) is None


async def five_users_applied(
    event_log: EventLog, users: UserFactory, start_replica: Replica, *, probe_interval_s: float
) -> tuple[list[str], list[str], Projector, UserKeys]:
    """Three users that the rewind keeps and two it loses, applied by a replica started here."""
    kept = await register(event_log, users, 3, "kept")
    lost = await register(event_log, users, 2, "lost")
    projector, keys, _ = await start_replica(probe_interval_s=probe_interval_s)
    await eventually(lambda: projector.ready and projector.checkpoint == 5)
    return kept, lost, projector, keys


async def _rewound_and_rebuilt(
    projector: Projector, keys: UserKeys, redis_client: aioredis.Redis, kept: list[str], lost: list[str], new: list[str]
) -> None:
    await eventually(lambda: projector.status().log_rewinds >= 1, timeout=10, message="the rewind was not noticed")
    await eventually(lambda: projector.ready, timeout=30, message="the views were not rebuilt")
    for user_id in kept + new:
        assert await view(redis_client, keys, user_id) is not None, user_id
    for user_id in lost:
        assert await view(redis_client, keys, user_id) is None, f"{user_id} no longer exists but is still served"


async def test_a_replica_that_sees_positions_again_with_other_events_rebuilds(
    event_log: EventLog,
    users: UserFactory,
    publisher: Publisher,
    start_replica: Replica,
    db_pool: asyncpg.Pool[Any],
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    kept = await register(event_log, users, 4, "kept")
    lost = await register(event_log, users, 3, "lost")
    projector, keys, readiness = await start_replica(probe_interval_s=60.0)  # only the stream can tell
    await eventually(lambda: projector.ready and projector.checkpoint == 7)
    served = await redis_client.get(pointer_key(redis_prefix, "users"))

    await rewind(db_pool, 4)
    new = await register(event_log, users, 3, "new")  # positions 5..7 again, other events
    started = time.monotonic()
    for envelope in await read_positioned(db_pool, 4, 10):
        await publisher.event(envelope)

    await _rewound_and_rebuilt(projector, keys, redis_client, kept, lost, new)
    assert time.monotonic() - started < 10
    assert readiness[-2:] == [False, True]
    assert await redis_client.get(pointer_key(redis_prefix, "users")) != served, "a new generation was built"


async def test_a_replica_notices_a_log_whose_head_went_below_it_on_its_probe(
    event_log: EventLog,
    users: UserFactory,
    start_replica: Replica,
    db_pool: asyncpg.Pool[Any],
    redis_client: aioredis.Redis,
) -> None:
    kept, lost, projector, keys = await five_users_applied(event_log, users, start_replica, probe_interval_s=0.2)

    await rewind(db_pool, 3)  # nothing published since: only the probe can tell

    await _rewound_and_rebuilt(projector, keys, redis_client, kept, lost, [])
    assert projector.checkpoint == 3


async def test_a_replica_started_after_the_rewind_notices_it_at_catch_up(
    event_log: EventLog,
    users: UserFactory,
    start_replica: Replica,
    db_pool: asyncpg.Pool[Any],
    redis_client: aioredis.Redis,
) -> None:
    kept, lost, first, keys = await five_users_applied(event_log, users, start_replica, probe_interval_s=60.0)
    await first.stop()

    await rewind(db_pool, 3)
    new = await register(event_log, users, 4, "new")  # the log is longer than before, yet different

    second, keys, _ = await start_replica(probe_interval_s=60.0)
    await _rewound_and_rebuilt(second, keys, redis_client, kept, lost, new)
    assert second.checkpoint == 7
