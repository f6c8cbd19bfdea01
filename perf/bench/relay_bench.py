"""Figure 5: one relay draining an outbox backlog, events/s, beside bare redis-py pipelined PUBLISHes.

The backlog is written straight into a fresh outbox with COPY (user events in
`outbox_event`, queued for a position by its trigger, as commands leave them) while no
relay runs. Then one relay starts; the clock starts when the first position is handed out
and stops when the published watermark has reached the last of the backlog's positions
(positions are gap-free, and nothing else writes).
Nothing subscribes to the channel, in either run. The ceiling publishes the same serialized
envelopes, in batches of the relay's default size, from one redis-py client.

Two rows share the measurement: the rate against its absolute goal, and the rate against the
bare PUBLISH of the same run (the machine's speed cancels out of that one).

On a machine whose cores are shared with other work, wall-clock rates say little on their
own, so the notes also give CPU time per event over the drain: the relay process and, when
Postgres runs on the same machine (its backends are readable in /proc), the relay's
Postgres sessions; and the bare client's own CPU time. Redis's CPU is left out of both: the
same PUBLISHes reach it either way, and it is shared with whatever else uses it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from devstack.supervisor import ServiceProcess
from perf.cpu import process_cpu_s
from perf.event_log import USER_EVENT_COLUMNS, user_events
from perf.stack import Backing, Scratch, scratch
from relay.outbox import CLAIM_SESSION_SETTINGS
from relay.settings import RelaySettings
from shared_kernel.contracts.event_log import ENVELOPE_COLUMNS, envelope_from_row, events_channel

from .table import Row, rate_rows

RELAY_BATCH = 500  # the relay's default RELAY_BATCH_SIZE
# The relay's default RELAY_MAX_BATCH_SIZE: while batches come back full, each claim doubles the next.
RELAY_MAX_BATCH = int(RelaySettings.model_fields["relay_max_batch_size"].default)
# A user event as a command leaves it: everything up to the position (which the relay assigns).
_UNPOSITIONED_COLUMNS = list(USER_EVENT_COLUMNS[: USER_EVENT_COLUMNS.index("position")])
_POSITIONED = "SELECT last_position FROM relay_state WHERE singleton"
# Polled every 10 ms while the relay drains, so it must stay cheap: a look at the queue of
# events waiting for a position (its ids leave it as they are claimed).
_DRAINED = """
SELECT NOT EXISTS (SELECT 1 FROM outbox_pending)
   AND (SELECT published_position = last_position FROM relay_state WHERE singleton)
"""
# When the bench knows how many events it wrote, the watermark alone says when they are out:
# positions are gap-free, so `since + events` published means every one of them went out.
# One row read, where the look for an unpositioned row walks the partial index over every
# row positioned since the last vacuum (the old versions stay in it while any transaction
# on the server holds back the xmin horizon), which at 100,000 rows took a quarter of a
# second per poll, on the cores the relay and Postgres were measured on.
_PUBLISHED_UP_TO = "SELECT published_position >= $1 FROM relay_state WHERE singleton"
# The relay's Postgres sessions: its pool and its lock session (application names
# tessera-relay and tessera-relay-lock) on this database.
_RELAY_BACKENDS = """
SELECT pid FROM pg_stat_activity
WHERE datname = current_database() AND application_name LIKE 'tessera-relay%'
"""


@dataclass(frozen=True, slots=True)
class RelaySizes:
    """How big the backlog is, and how many times it is drained."""

    events: int = 100_000
    rounds: int = 2
    timeout_s: float = 300.0


def relay_rows() -> list[Row]:
    """The rows this bench fills: the drain rate against its goal, and against bare PUBLISH."""
    how = "one relay process, Postgres outbox → Redis PUBLISH, no subscribers"
    ceiling_label = "bare redis-py pipeline PUBLISH, same payloads"
    figures = ("relay draining an outbox backlog, events/s", "relay drain against bare PUBLISH")
    return rate_rows("relay", figures, 30_000, 0.7, how=how, ceiling_label=ceiling_label)


def unpositioned_events(count: int, seed: int) -> Iterator[tuple[Any, ...]]:
    """`count` user events as a command leaves them in the outbox: no position, not published."""
    for row in user_events(count, seed=seed):
        yield row[: len(_UNPOSITIONED_COLUMNS)]


async def insert_backlog(url: str, count: int, seed: int, chunk: int = 20_000) -> None:
    """COPY `count` unpositioned user events into the outbox at `url` (its trigger queues them for the relay)."""
    conn = await asyncpg.connect(url)
    try:
        rows = unpositioned_events(count, seed)
        async with conn.transaction():
            while batch := list(itertools.islice(rows, chunk)):
                await conn.copy_records_to_table("outbox_event", records=batch, columns=_UNPOSITIONED_COLUMNS)
    finally:
        await conn.close()


async def wait_drained(
    conn: Any,
    *,
    since: int,
    timeout_s: float,
    relay: ServiceProcess | None = None,
    on_begin: Callable[[], Awaitable[None]] | None = None,
    events: int | None = None,
) -> float:
    """Seconds from the first position after `since` to an outbox with nothing left to position or publish.

    `on_begin` runs once, when the first position is seen (before the drain is timed further).
    With `events` (how many were written after `since`, and nothing else writes), drained means
    the watermark has reached `since + events`.
    """
    deadline = time.monotonic() + timeout_s
    began: float | None = None
    while True:
        now = time.perf_counter()
        if began is None and int(await conn.fetchval(_POSITIONED)) > since:
            began = now
            if on_begin is not None:
                await on_begin()
        if began is not None and (
            await conn.fetchval(_PUBLISHED_UP_TO, since + events)
            if events is not None
            else await conn.fetchval(_DRAINED)
        ):
            return time.perf_counter() - began
        if relay is not None and not relay.running:
            raise RuntimeError(f"the relay exited: {relay.log_tail(10)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the outbox was not drained within {timeout_s:g} s")
        await asyncio.sleep(0.01)


def start_relay(place: Scratch) -> ServiceProcess:
    """Start one relay on `place` (not waiting for anything: it has no health port)."""
    return ServiceProcess.python_module(
        "relay",
        "relay",
        env={
            "DATABASE_URL": place.database_url,
            "REDIS_URL": place.redis_url,
            "REDIS_KEY_PREFIX": place.prefix,
            "LOG_LEVEL": "WARNING",
        },
    ).start()


@dataclass(slots=True)
class RelayCpu:
    """CPU seconds of the relay process and of its Postgres sessions, read from /proc."""

    relay_pid: int
    relay_s: float = 0.0
    postgres_s: float = 0.0
    # Postgres's backends are visible only when it runs on this machine.
    postgres_seen: bool = False

    async def sample(self, conn: Any) -> tuple[float, float]:
        """CPU seconds so far: (relay process, its Postgres sessions that are readable here)."""
        pids = [int(record["pid"]) for record in await conn.fetch(_RELAY_BACKENDS)]
        backends = [process_cpu_s(pid) for pid in pids]
        if any(seconds > 0 for seconds in backends):
            self.postgres_seen = True
        return process_cpu_s(self.relay_pid), sum(backends)


async def bare_publish(redis_url: str, channel: str, payloads: list[bytes], batch: int = RELAY_BATCH) -> float:
    """Seconds to PUBLISH `payloads` in pipelines of `batch`, from one client."""
    seconds, _cpu = await bare_publish_timed(redis_url, channel, payloads, batch)
    return seconds


async def bare_publish_timed(
    redis_url: str, channel: str, payloads: list[bytes], batch: int = RELAY_BATCH
) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds to PUBLISH `payloads` in pipelines of `batch`, from one client."""
    client = aioredis.Redis.from_url(redis_url, socket_timeout=30)
    try:
        await client.ping()
        began = time.perf_counter()
        cpu_began = time.process_time()
        for start in range(0, len(payloads), batch):
            pipe = client.pipeline(transaction=False)
            for payload in payloads[start : start + batch]:
                pipe.publish(channel, payload)
            await pipe.execute()
        return time.perf_counter() - began, time.process_time() - cpu_began
    finally:
        await client.aclose()


async def measure_relay(backing: Backing, sizes: RelaySizes) -> list[Row]:
    """Fill the relay rows: each round drains a new backlog, then PUBLISHes its payloads bare; best of each."""
    rows = relay_rows()
    drains: list[float] = []
    bares: list[float] = []
    bare_cpus: list[float] = []
    relay_cpus: list[RelayCpu] = []
    async with scratch(backing, "relay") as place:
        conn = await asyncpg.connect(place.database_url, server_settings=CLAIM_SESSION_SETTINGS)
        try:
            for round_index in range(sizes.rounds):
                since = int(await conn.fetchval(_POSITIONED))
                await insert_backlog(place.database_url, sizes.events, seed=100 + round_index)
                relay = start_relay(place)
                try:
                    cpu = RelayCpu(relay_pid=relay.pid or 0)
                    started: list[tuple[float, float]] = []

                    async def take_start(cpu: RelayCpu = cpu, started: list[tuple[float, float]] = started) -> None:
                        started.append(await cpu.sample(conn))

                    drains.append(
                        await wait_drained(
                            conn,
                            since=since,
                            timeout_s=sizes.timeout_s,
                            relay=relay,
                            on_begin=take_start,
                            events=sizes.events,
                        )
                    )
                    relay_s, postgres_s = await cpu.sample(conn)
                    cpu.relay_s = relay_s - started[0][0]
                    cpu.postgres_s = postgres_s - started[0][1]
                    relay_cpus.append(cpu)
                finally:
                    relay.terminate()
                records = await conn.fetch(
                    f"SELECT {ENVELOPE_COLUMNS} FROM outbox WHERE position > $1 ORDER BY position",  # noqa: S608
                    since,
                )
                payloads = [envelope_from_row(record).SerializeToString() for record in records]
                bare_s, bare_cpu_s = await bare_publish_timed(place.redis_url, events_channel(place.prefix), payloads)
                bares.append(bare_s)
                bare_cpus.append(bare_cpu_s)
        finally:
            await conn.close()
    rates = [sizes.events / seconds for seconds in drains]
    ceilings = [sizes.events / seconds for seconds in bares]
    for row in rows:
        row.value = max(rates)
        row.ceiling = max(ceilings)
        row.how = (
            f"one relay process (batch {RELAY_BATCH} growing to {RELAY_MAX_BATCH:,}), "
            f"{sizes.events:,}-event backlog, best of {len(drains)}"
        )
    rows[0].notes.append(
        "rounds, relay / bare PUBLISH: "
        + ", ".join(f"{rate:,.0f} / {bare:,.0f} events/s" for rate, bare in zip(rates, ceilings, strict=True))
    )
    rows[0].notes.append(
        f"ceiling: the round's {sizes.events:,} envelopes PUBLISHed in pipelines of {RELAY_BATCH} by one client"
    )
    rows[0].notes.append(
        "CPU µs per event, rounds: "
        + "; ".join(_cpu_note(cpu, bare, sizes.events) for cpu, bare in zip(relay_cpus, bare_cpus, strict=True))
    )
    return rows


def _cpu_note(cpu: RelayCpu, bare_cpu_s: float, events: int) -> str:
    per_event = 1e6 / events
    relay = f"relay process {cpu.relay_s * per_event:.1f}"
    if cpu.postgres_seen:
        total = (cpu.relay_s + cpu.postgres_s) * per_event
        relay += f" + its Postgres sessions {cpu.postgres_s * per_event:.1f} = {total:.1f}"
    else:
        relay += " (Postgres not on this machine: its sessions not counted)"
    return f"{relay}; bare client {bare_cpu_s * per_event:.1f}"
