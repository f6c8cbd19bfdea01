"""A plausible users history written straight into an event log, as the relay leaves it.

The rebuild, relay, Redis-loss, live-apply and search measurements seed their scratch
databases with it by COPY: positioned and published outbox rows, no write service involved.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from read_service.upcasting import current_version
from tessera.users.v1.events_pb2 import UserDeactivated, UserProfileUpdated, UserRegistered

# The columns of a `user_events` row, in order (what COPY into the outbox is given).
USER_EVENT_COLUMNS = (
    "event_id",
    "event_type",
    "schema_version",
    "aggregate_type",
    "aggregate_id",
    "aggregate_version",
    "payload",
    "occurred_at",
    "position",
)
_BASE = datetime(2025, 1, 1, tzinfo=UTC)


def user_events(count: int, seed: int = 7) -> Iterator[tuple[Any, ...]]:
    """`count` outbox rows of a plausible users history, at positions 1..count."""
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not secrets
    users: list[tuple[str, int, bool]] = []  # id, version, active
    for position in range(1, count + 1):
        at = _BASE + timedelta(seconds=position)
        roll = rng.random()
        if not users or roll < 0.6:
            user_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            n = len(users)
            payload: Any = UserRegistered(
                user_id=user_id, email=f"user{n}@example.com", username=f"user{n}", display_name=f"User {n}"
            )
            payload.registered_at.FromDatetime(at)
            users.append((user_id, 1, True))
            version = 1
        else:
            index = rng.randrange(len(users))
            user_id, version, active = users[index]
            version += 1
            if active and roll > 0.9:
                payload = UserDeactivated(user_id=user_id, reason="benchmark")
                payload.deactivated_at.FromDatetime(at)
                active = False
            else:
                payload = UserProfileUpdated(user_id=user_id, full_name=f"Renamed {position}", bio="bio")
                payload.updated_at.FromDatetime(at)
            users[index] = (user_id, version, active)
        yield (
            uuid.uuid4(),
            payload.DESCRIPTOR.full_name,
            current_version(payload.DESCRIPTOR.full_name),
            "user",
            user_id,
            version,
            payload.SerializeToString(),
            at,
            position,
        )


async def copy_positioned(conn: Any, rows: list[tuple[Any, ...]]) -> None:
    """COPY outbox rows that carry their positions (`USER_EVENT_COLUMNS`) into the log, as the relay leaves them.

    The `outbox` view takes them too, but row by row through its trigger; this writes the
    events, their positions and (emptied again) the pending queue a COPY each.
    """
    if not rows:
        return
    async with conn.transaction():
        ids = [r[0] for r in await conn.fetch("SELECT nextval('outbox_id_seq') FROM generate_series(1, $1)", len(rows))]
        await conn.copy_records_to_table(
            "outbox_event",
            records=[(id_, *row[:8]) for id_, row in zip(ids, rows, strict=True)],
            columns=["id", *USER_EVENT_COLUMNS[:8]],
        )
        await conn.execute("DELETE FROM outbox_pending WHERE id = ANY($1::bigint[])", ids)
        await conn.copy_records_to_table(
            "outbox_position",
            records=[(id_, row[8]) for id_, row in zip(ids, rows, strict=True)],
            columns=["outbox_id", "position"],
        )


async def seed_users(pool: asyncpg.Pool[Any], count: int, chunk: int = 20_000) -> int:
    """Write `count` positioned, published user events to an empty log; return the number of users."""
    rows = list(user_events(count))
    async with pool.acquire() as conn, conn.transaction():
        for start in range(0, len(rows), chunk):
            await copy_positioned(conn, rows[start : start + chunk])
        await conn.execute("UPDATE relay_state SET last_position = $1, published_position = $1", count)
    return sum(1 for row in rows if row[5] == 1)
