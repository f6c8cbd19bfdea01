"""Measure how long a replica takes to serve again after Redis lost every view.

Seeds a fresh database's event log with N user registrations (positioned and published, as
the relay leaves them), starts a stack (write service, one relay, one replica) on a Redis of
its own without persistence, waits until the replica serves all N users, then kills and
restarts that Redis. Reports:

- notice_s: from the kill to the replica's health leaving SERVING;
- restart_to_serving_s: from Redis accepting connections again to the replica SERVING;
- replica_cpu_s: the replica process's CPU time over that span (Linux), and events per CPU-second;
- and checks that every user is served again (GetUser of each).

    python -m perf redis-loss -n 10000 [--json results/redis_loss.json]

Uses DATABASE_URL (an admin DSN: a database is created and dropped) when set, otherwise an
embedded Postgres; Redis is always a throwaway embedded server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from devstack.servers import EmbeddedRedis, postgres_admin_url
from devstack.supervisor import Stack, one_replica_config
from perf.event_log import copy_positioned, user_events
from perf.report import write_json
from perf.stack import scratch_database
from shared_kernel.platform.healthcheck import check_serving_async
from tessera.users.v1 import user_query_service_pb2 as queries
from tessera.users.v1 import user_query_service_pb2_grpc as queries_grpc


async def seed_registrations(url: str, users: int) -> list[str]:
    """`users` registrations at positions 1..users; return the user ids."""
    rows: list[tuple[Any, ...]] = []
    generated = user_events(users * 3)
    while len(rows) < users:
        row = next(generated)
        if row[5] == 1:  # a registration (aggregate version 1)
            rows.append((*row[:8], len(rows) + 1))
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await copy_positioned(conn, rows)
            await conn.execute("UPDATE relay_state SET last_position = $1, published_position = $1", len(rows))
    finally:
        await conn.close()
    return [str(row[4]) for row in rows]


async def _wait(condition: Any, within: float, what: str) -> float:
    started = time.monotonic()
    while not await condition():
        if time.monotonic() - started > within:
            raise TimeoutError(f"{what} did not happen within {within:g} s")
        await asyncio.sleep(0.01)
    return time.monotonic()


async def _all_served(address: str, ids: list[str]) -> int:
    """GetUser of every id (32 at a time); return how many were found."""
    found = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = queries_grpc.UserQueryServiceStub(channel)
        for start in range(0, len(ids), 32):
            replies = await asyncio.gather(
                *(stub.GetUser(queries.GetUserRequest(user_id=i), timeout=10) for i in ids[start : start + 32]),
                return_exceptions=True,
            )
            found += sum(1 for r in replies if not isinstance(r, BaseException))
    return found


async def measure(admin_url: str, users: int, logs: Path, startup_timeout_s: float = 60.0) -> dict[str, Any]:
    """Seed, start, kill and restart Redis; return the figures."""
    redis = await asyncio.to_thread(EmbeddedRedis().start)
    try:
        async with scratch_database(admin_url) as url:
            ids = await seed_registrations(url, users)
            config = one_replica_config(
                url,
                redis.url,
                "loss",
                logs,
                env={"LOG_LEVEL": "INFO"},
                # The replica first builds its views of the whole seeded log.
                startup_timeout=startup_timeout_s,
            )
            stack = await Stack(config).start_async()
            try:
                address = stack.read_addresses[0]
                initial = await _all_served(address, ids)
                if initial != users:
                    raise RuntimeError(f"only {initial} of {users} users served before the fault")
                killed = time.monotonic()
                await asyncio.to_thread(redis.kill)
                noticed = await _wait(
                    lambda: _not(check_serving_async(address, rpc_timeout=0.5)), 10, "leaving SERVING"
                )
                replica = stack.readers[0].pid
                await asyncio.to_thread(redis.start)
                back = time.monotonic()
                cpu_back = _cpu_seconds(replica)
                serving = await _wait(lambda: check_serving_async(address, rpc_timeout=0.5), 300, "SERVING again")
                cpu = _cpu_seconds(replica) - cpu_back
                served = await _all_served(address, ids)
            finally:
                await stack.stop_async()
    finally:
        await asyncio.to_thread(redis.stop)
    return {
        "users": users,
        "notice_s": round(noticed - killed, 3),
        "restart_to_serving_s": round(serving - back, 3),
        # The replica's own CPU time over the same span: on a busy machine the steadier figure.
        "replica_cpu_s": round(cpu, 3),
        "events_per_replica_cpu_s": round(users / cpu) if cpu > 0 else None,
        "served_after": served,
    }


def _cpu_seconds(pid: int | None) -> float:
    """User and system CPU time of process `pid` so far (Linux /proc), 0 when it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    # utime and stime are fields 14 and 15 of stat(5), in clock ticks; fields[0] is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _not(check: Any) -> bool:
    return not await check


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--users", type=int, default=10_000)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=60.0,
        help="seconds the stack may take to serve the seeded log at first (a large -n on a busy machine needs more)",
    )
    args = parser.parse_args(argv)
    with (
        postgres_admin_url("DATABASE_URL") as admin_url,
        tempfile.TemporaryDirectory(prefix="redis-loss-logs-") as logs,
    ):
        figures = asyncio.run(measure(admin_url, args.users, Path(logs), args.startup_timeout))
    print(json.dumps(figures, indent=2))
    if args.json is not None:
        write_json(args.json, figures)
    return 0 if figures["served_after"] == args.users else 1


if __name__ == "__main__":
    sys.exit(main())
