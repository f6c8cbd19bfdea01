"""Waiting helpers shared by the write service's integration tests."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg


async def wait_until_blocked(pool: asyncpg.Pool[Any], timeout: float = 5.0) -> None:
    """Return once some session of the test database waits on a lock; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        waiting = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        if waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no session started waiting on a lock")
