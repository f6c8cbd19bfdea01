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
import json
import secrets
import sys
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from perf.event_log import seed_users
from perf.report import write_json
from perf.stack import backing_servers, scratch_database
from read_service.generations import drop_keyspace
from read_service.rebuild import rebuild, registered_projections


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
        write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
