"""Small pieces the fault schedules share: interruptible sleeps and recovery timings."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg

from devstack.chaos import ChaosStack, head_position, lock_holder_port, wait_caught_up
from tests.chaos.workload import Workload

_DB_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


async def sleep_unless(done: asyncio.Event, seconds: float) -> bool:
    """Sleep `seconds` or until `done`; return whether `done` is set."""
    try:
        async with asyncio.timeout(seconds):
            await done.wait()
    except TimeoutError:
        return False
    return True


async def wait_for_holder(stack: ChaosStack, other_than: int | None, timeout_s: float) -> tuple[int | None, float]:
    """Poll until a session other than `other_than` holds the relay lock; return (its port, seconds)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        port = await lock_holder_port(stack.database_url)
        if port is not None and port != other_than:
            return port, time.monotonic() - started
        await asyncio.sleep(0.02)
    return None, time.monotonic() - started


async def backlog_published(database_url: str, timeout_s: float) -> float | None:
    """Seconds until every outbox row committed before the call is published; None on timeout."""
    started = time.monotonic()
    last_id: int | None = None
    while time.monotonic() - started < timeout_s:
        try:
            conn = await asyncpg.connect(database_url, timeout=2)
            try:
                if last_id is None:
                    last_id = int(await conn.fetchval("SELECT coalesce(max(id), 0) FROM outbox", timeout=5))
                pending = await conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM outbox CROSS JOIN relay_state"
                    " WHERE id <= $1 AND NOT coalesce(position <= published_position, false))",
                    last_id,
                    timeout=5,
                )
            finally:
                await conn.close()
            if not pending:
                return time.monotonic() - started
        except _DB_ERRORS:
            pass  # Postgres may still be coming back
        await asyncio.sleep(0.05)
    return None


async def first_ack_after(workload: Workload, timeout_s: float) -> float | None:
    """Seconds until the workload gets its next acknowledged reply; None on timeout."""
    started = time.monotonic()
    acked = workload.stats.outcomes["ok"]
    while workload.stats.outcomes["ok"] == acked:
        if time.monotonic() - started > timeout_s or workload.finished_at:
            return None
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def views_caught_up(stack: ChaosStack, timeout_s: float) -> float | None:
    """Seconds until the views reach the relay's head of now (read once Postgres answers), every replica SERVING."""
    started = time.monotonic()
    while True:
        try:
            target = await head_position(stack.database_url)
            break
        except _DB_ERRORS:
            if time.monotonic() - started > timeout_s:
                return None
            await asyncio.sleep(0.05)
    caught_up = await wait_caught_up(stack, target, max(timeout_s - (time.monotonic() - started), 0.1))
    return None if caught_up is None else time.monotonic() - started


async def recovery(stack: ChaosStack, workload: Workload, timeout_s: float = 60.0) -> dict[str, Any]:
    """Right after a fault healed: seconds until a write succeeds, the relay has published the
    backlog, and the views have caught up with the head (every replica SERVING), timed together."""
    write_s, relay_s, views_s = await asyncio.gather(
        first_ack_after(workload, timeout_s),
        backlog_published(stack.database_url, timeout_s),
        views_caught_up(stack, timeout_s),
    )
    return {
        "write_recovered_s": _round(write_s),
        "relay_recovered_s": _round(relay_s),
        "views_recovered_s": _round(views_s),
    }


def _round(value: float | None) -> float | None:
    return round(value, 2) if value is not None else None
