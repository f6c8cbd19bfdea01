"""Benchmark a blue/green rebuild: events per second from the Postgres event log into Redis.

Seeds a fresh database's event log with N user events (registrations, profile updates and
deactivations, already positioned and published, as the relay leaves them), then runs
`read_service.rebuild` for the users projection twice: a first build, and a rebuild that
switches from it and drops it (the figure an operator sees). Prints events/s of each.

    python -m perf rebuild -n 100000 [--batch-size 5000] [--json results/rebuild.json]

Uses DATABASE_URL (an admin DSN: a database is created and dropped) and REDIS_URL (keys under
a random prefix, removed afterwards) when set; otherwise starts embedded servers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis.asyncio as aioredis

from read_service.generations import drop_keyspace
from read_service.rebuild import rebuild, registered_projections
from read_service.upcasting import current_version
from shared_kernel import migrations
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


async def seed_users(pool: asyncpg.Pool[Any], count: int, chunk: int = 20_000) -> int:
    """Write `count` positioned, published user events to an empty log; return the number of users."""
    rows = list(user_events(count))
    async with pool.acquire() as conn, conn.transaction():
        for start in range(0, len(rows), chunk):
            batch = rows[start : start + chunk]
            await conn.copy_records_to_table("outbox", records=batch, columns=list(USER_EVENT_COLUMNS))
        await conn.execute("UPDATE relay_state SET last_position = $1, published_position = $1", count)
    return sum(1 for row in rows if row[5] == 1)


def _with_database(dsn: str, database: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + database))


@contextlib.asynccontextmanager
async def scratch_database(admin_url: str) -> AsyncIterator[str]:
    """A new, migrated database, dropped on exit."""
    name = f"tessera_bench_{secrets.token_hex(5)}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = _with_database(admin_url, name)
    try:
        conn = await asyncpg.connect(url)
        try:
            await migrations.apply(conn)
        finally:
            await conn.close()
        yield url
    finally:
        admin = await asyncpg.connect(admin_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@contextlib.contextmanager
def backing_servers() -> Iterator[tuple[str, str]]:
    """DATABASE_URL and REDIS_URL, or embedded servers for what is not set."""
    with contextlib.ExitStack() as stack:
        database = os.environ.get("DATABASE_URL")
        redis_url = os.environ.get("REDIS_URL")
        if not database:
            from devstack.servers import EmbeddedPostgres

            database = stack.enter_context(EmbeddedPostgres()).url
        if not redis_url:
            from devstack.servers import EmbeddedRedis

            redis_url = stack.enter_context(EmbeddedRedis()).url
        yield database, redis_url


async def measure(admin_url: str, redis_url: str, events: int, batch_size: int) -> dict[str, Any]:
    """Seed, build, rebuild; return the figures."""
    spec = registered_projections()["users"]
    prefix = f"bench:{secrets.token_hex(4)}:"
    async with scratch_database(admin_url) as url:
        pool: asyncpg.Pool[Any] = await asyncpg.create_pool(url, min_size=1, max_size=4)
        client = aioredis.Redis.from_url(redis_url, socket_timeout=30)
        try:
            users = await seed_users(pool, events)
            first = await rebuild(client, pool, prefix, spec, batch_size=batch_size, stream=sys.stderr)
            second = await rebuild(client, pool, prefix, spec, batch_size=batch_size, grace_s=0.0, stream=sys.stderr)
        finally:
            await drop_keyspace(client, prefix)
            await client.aclose()
            await pool.close()
    return {
        "events": events,
        "users": users,
        "batch_size": batch_size,
        "first_build_s": round(first.elapsed_s, 3),
        "first_build_events_per_s": round(first.events_per_s),
        "rebuild_s": round(second.elapsed_s, 3),
        "rebuild_events_per_s": round(second.events_per_s),
        "old_keys_dropped": second.dropped_keys,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--events", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    with backing_servers() as (database, redis_url):
        figures = asyncio.run(measure(database, redis_url, args.events, args.batch_size))
    print(json.dumps(figures, indent=2))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
