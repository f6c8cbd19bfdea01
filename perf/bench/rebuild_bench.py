"""Figure 7: blue/green rebuild of the users projection, events/s, beside a raw Redis HSET pipeline.

The rebuild is `perf.rebuild.measure` (seeded event log, a first build, then the
rebuild an operator runs; the figure is the rebuild's). The baseline writes one hash per user
(the same number of keys the rebuild ends with) with pipelined HSETs from one client: the
Redis write cost alone, without reading the log or applying events.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from perf.rebuild import measure as measure_rebuild
from perf.stack import Backing, clear_prefix

from .table import Goal, Row

PIPELINE = 1000


@dataclass(frozen=True, slots=True)
class RebuildSizes:
    """How many events the log holds, and the rebuild's batch size."""

    events: int = 100_000
    batch_size: int = 5000


def rebuild_rows() -> list[Row]:
    """The rows this bench fills."""
    return [
        Row(
            key="rebuild",
            figure="projection rebuild (users), events/s",
            unit="events/s",
            goal=Goal("value", ">=", 10_000, "events/s"),
            how="read_service.rebuild via perf.rebuild",
            ceiling_label="raw Redis HSET pipeline, one hash per user",
            ceiling_unit="hashes/s",
        )
    ]


async def hset_rate(redis_url: str, keys: int) -> float:
    """Hashes written per second by pipelined HSETs (5 fields each) from one client."""
    prefix = f"bench:hset:{secrets.token_hex(4)}:"
    client = aioredis.Redis.from_url(redis_url, socket_timeout=30)
    try:
        began = time.perf_counter()
        for start in range(0, keys, PIPELINE):
            pipe = client.pipeline(transaction=False)
            for n in range(start, min(keys, start + PIPELINE)):
                pipe.hset(
                    f"{prefix}user:{n}",
                    mapping={
                        "email": f"user{n}@example.com",
                        "username": f"user{n}",
                        "full_name": f"User {n}",
                        "active": "1",
                        "version": "1",
                    },
                )
            await pipe.execute()
        elapsed = time.perf_counter() - began
    finally:
        await client.aclose()
        await clear_prefix(redis_url, prefix)
    return keys / elapsed


async def measure_rebuild_row(backing: Backing, sizes: RebuildSizes) -> list[Row]:
    """Fill the rebuild row."""
    (row,) = rows = rebuild_rows()
    figures = await measure_rebuild(backing.admin_url, backing.redis_url, sizes.events, sizes.batch_size)
    users = int(figures["users"])
    row.value = float(figures["rebuild_events_per_s"])
    row.ceiling = await hset_rate(backing.redis_url, users)
    row.how = f"read_service.rebuild of {sizes.events:,} user events ({users:,} users), batch {sizes.batch_size}"
    row.notes.append(
        f"first build {figures['first_build_events_per_s']:,} events/s; rebuild {figures['rebuild_s']} s; "
        f"the ceiling writes {users:,} hashes (one per user the rebuild ends with); the ratio compares events "
        "applied with hashes written"
    )
    return rows
