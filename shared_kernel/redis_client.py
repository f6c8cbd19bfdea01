"""Redis client pieces shared by the relay and the read service."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.connection import Connection

logger = logging.getLogger(__name__)


class ClosedTransportAwareConnection(Connection):
    """A Redis connection that reports a write to a connection the server closed as a ConnectionError.

    Under uvloop (which the processes run on) writing to a transport the peer has reset
    raises RuntimeError ("unable to perform operation on <TCPTransport closed=True>; the
    handler is closed", uvloop#506) where the default loop raises ConnectionResetError, and
    redis-py passes it on unchanged: a Redis restart would look like a bug (the relay would
    crash, a query would answer INTERNAL). As a ConnectionError it is retried like any other
    outage, and beyond the retries callers get UNAVAILABLE.
    """

    async def send_packed_command(self, command: bytes | str | Iterable[bytes], check_health: bool = True) -> None:
        """Send `command`; a closed transport raises redis.exceptions.ConnectionError."""
        try:
            await super().send_packed_command(command, check_health)
        except RuntimeError as exc:
            if "handler is closed" not in str(exc):
                raise
            raise redis.exceptions.ConnectionError(f"the connection was closed: {exc}") from exc


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
