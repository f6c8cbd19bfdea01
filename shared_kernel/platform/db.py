"""Postgres connections and pools, opened in a composition root inside the running loop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import asyncpg

from shared_kernel.platform.settings import DatabaseSettings

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Errors that mean "not up yet"; a bad password or a missing database fails at once.
NOT_UP_YET: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.PostgresConnectionError,
)


async def retry_while_starting(open_: Callable[[], Awaitable[T]], wait_s: float) -> T:
    """Call `open_` until it stops failing with a NOT_UP_YET error or `wait_s` runs out."""
    deadline = time.monotonic() + wait_s
    delay = 0.1
    while True:
        try:
            return await open_()
        except NOT_UP_YET as exc:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning("Postgres not reachable yet (%s), retrying", type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def keep_session(conn: asyncpg.Connection[Any]) -> None:
    """A pool reset that sends nothing: asyncpg still rolls back a transaction left open.

    The default reset runs `pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL` on
    every release, a round trip that a caller doing one short statement per acquire pays
    twice. Only for pools whose users never leave session state behind (session advisory
    locks, LISTEN, session SETs, cursors outside a transaction).
    """


async def create_pool(
    settings: DatabaseSettings,
    application_name: str,
    wait_s: float = 30.0,
    *,
    reset_sessions: bool = True,
    session_settings: Mapping[str, str] | None = None,
) -> asyncpg.Pool[Any]:
    """Open a pool, retrying until Postgres answers or `wait_s` runs out.

    `reset_sessions=False` skips the server-side reset on release (see `keep_session`);
    `session_settings` are further settings every connection of the pool starts with.
    """
    server_settings = {**(session_settings or {}), "application_name": application_name}
    if settings.database_statement_timeout_ms:
        server_settings["statement_timeout"] = str(settings.database_statement_timeout_ms)

    async def open_pool() -> asyncpg.Pool[Any]:
        pool: asyncpg.Pool[Any] = await asyncpg.create_pool(
            str(settings.database_url),
            min_size=settings.database_pool_min_size,
            max_size=settings.database_pool_max_size,
            timeout=settings.database_connect_timeout_s,
            command_timeout=settings.database_statement_timeout_ms / 1000 or None,
            server_settings=server_settings,
            reset=None if reset_sessions else keep_session,
        )
        return pool

    return await retry_while_starting(open_pool, wait_s)
