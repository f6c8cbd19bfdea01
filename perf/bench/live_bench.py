"""One replica applying a live backlog beside the relay's drain, and a lost Redis back to SERVING.

Live apply is `perf.live_apply.measure`: a mixed user/product/order stream of N
events, published while the replica's loop is held (as after a write burst), timed until
every projection of the one replica reaches position N. N stays below the replica's live
buffer, so the figure is the live path, not a catch-up from the log. Its ceiling is one relay
draining an outbox backlog of the same size in the same run (perf.bench.relay_bench): a
replica slower than that falls behind during every write burst.

Redis loss is `perf.redis_loss.measure`: a replica serving N registrations loses
its Redis (killed and restarted empty); the figure is from Redis accepting connections again
to the replica SERVING.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from perf.bench.relay_bench import insert_backlog, start_relay, wait_drained
from perf.live_apply import measure as measure_live_apply
from perf.redis_loss import measure as measure_redis_loss
from perf.stack import Backing, scratch
from relay.outbox import CLAIM_SESSION_SETTINGS

from .table import Goal, Row, rate_rows

HOW_LIVE = "one in-process replica (perf.live_apply), backlog published while its loop is held"
RELAY_LABEL = "one relay draining an outbox backlog of the same size"


@dataclass(frozen=True, slots=True)
class LiveSizes:
    """Events in the live backlog (below the replica's 10,000-message live buffer)."""

    events: int = 9_000
    timeout_s: float = 300.0


@dataclass(frozen=True, slots=True)
class RedisLossSizes:
    """Registrations the replica serves when its Redis is lost (one event each)."""

    events: int = 100_000
    # The stack first serves the whole seeded log: a busy machine needs more than a minute.
    startup_timeout_s: float = 600.0


def live_rows() -> list[Row]:
    """The live apply rows: the rate against its goal, and against the relay's drain rate."""
    figures = (
        "live apply, one replica, mixed user/product/order backlog, events/s",
        "live apply against the relay's drain",
    )
    return rate_rows("live", figures, 20_000, 1.0, how=HOW_LIVE, ceiling_label=RELAY_LABEL)


def redis_loss_rows() -> list[Row]:
    """The Redis loss row."""
    return [
        Row(
            key="redis-loss",
            figure="lost Redis back to SERVING (goal for 100,000 events), s",
            unit="s",
            goal=Goal("value", "<=", 5.0, "s"),
            how="perf.redis_loss",
        )
    ]


async def relay_drain_rate(backing: Backing, events: int, timeout_s: float) -> float:
    """Events/s of one relay draining a backlog of `events` unpositioned events (a fresh database: from position 0)."""
    async with scratch(backing, "live-relay") as place:
        conn = await asyncpg.connect(place.database_url, server_settings=CLAIM_SESSION_SETTINGS)
        try:
            await insert_backlog(place.database_url, events, seed=300)
            relay = start_relay(place)
            try:
                seconds = await wait_drained(conn, since=0, timeout_s=timeout_s, relay=relay)
            finally:
                relay.terminate()
        finally:
            await conn.close()
    return events / seconds


async def measure_live(backing: Backing, sizes: LiveSizes) -> list[Row]:
    """Fill the live apply rows."""
    rows = live_rows()
    figures = await measure_live_apply(backing.admin_url, backing.redis_url, sizes.events)
    drain = await relay_drain_rate(backing, sizes.events, sizes.timeout_s)
    for row in rows:
        row.value = float(figures["events_per_s"])
        row.ceiling = drain
        row.how = f"{HOW_LIVE}; {sizes.events:,} events"
    rows[0].notes.append(
        f"{figures['events_per_replica_cpu_s']:,} events per replica CPU-second (the steadier figure on a busy "
        f"machine); catch-ups from the log during the run: {figures['catch_ups_during_run']}; "
        f"the ceiling's backlog is user events only"
    )
    return rows


async def measure_redis_loss_row(backing: Backing, sizes: RedisLossSizes) -> list[Row]:
    """Fill the Redis loss row."""
    (row,) = rows = redis_loss_rows()
    with tempfile.TemporaryDirectory(prefix="tessera-bench-redis-loss-") as logs:
        figures = await measure_redis_loss(backing.admin_url, sizes.events, Path(logs), sizes.startup_timeout_s)
    if figures["served_after"] != sizes.events:
        return [row.fail(f"only {figures['served_after']} of {sizes.events} users served again")]
    row.value = float(figures["restart_to_serving_s"])
    row.how = f"perf.redis_loss, {sizes.events:,} registrations (one event each), one replica"
    row.notes.append(f"the replica left SERVING {figures['notice_s']} s after Redis was killed")
    if figures.get("events_per_replica_cpu_s"):
        row.notes.append(
            f"{figures['events_per_replica_cpu_s']:,} events per replica CPU-second while it recovered "
            f"({figures['replica_cpu_s']} s of CPU)"
        )
    return rows
