"""Redis client pieces shared by the relay and the read service."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

logger = logging.getLogger(__name__)


async def warm_up(client: aioredis.Redis, connections: int, timeout_s: float) -> int:
    """Open up to `connections` pooled connections now, so that the first burst of commands finds them.

    Without it the pool opens a connection (TCP handshake, HELLO) inside the first commands
    that run concurrently, which under load adds that set-up to their latency. Best effort:
    a Redis that is down or slow is left to the callers' own retries; returns how many opened.
    """
    pool = client.connection_pool
    taken: list[Any] = []
    try:
        async with asyncio.timeout(timeout_s):
            for _ in range(connections):
                taken.append(await pool.get_connection())  # type: ignore[no-untyped-call]  # untyped in redis-py
    except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
        logger.info("Redis connection warm-up stopped after %d connections: %s", len(taken), exc)
    finally:
        for connection in taken:
            await pool.release(connection)
    return len(taken)
