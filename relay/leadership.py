"""The relay's dedicated Postgres session: it holds the advisory lock and LISTENs while active.

The lock is session-level, so it lives exactly as long as this connection: when the
process dies, its socket closes, the server ends the session and a standby's next
`pg_try_advisory_lock` succeeds. The connection never comes from the pool, because a pool
resets released connections with `pg_advisory_unlock_all()` and `UNLISTEN *`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import asyncpg

from relay.outbox import Fence, LeadershipLost

logger = logging.getLogger(__name__)

Connect: TypeAlias = "Callable[[], Awaitable[asyncpg.Connection[Any]]]"
NotifyCallback: TypeAlias = Callable[[], None]

# What a lost or failing Postgres session can raise. asyncpg raises InternalClientError
# ("cannot switch to state N; another operation (2) is in progress") rather than a
# connection error when the server ends a session (pg_terminate_backend, a restart) just
# as a query starts on it (MagicStack/asyncpg#1069); the chaos suite hits it.
POSTGRES_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)

_HOLDS_LOCK = """
SELECT EXISTS (
    SELECT 1 FROM pg_locks
    WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid()
      AND classid = $1::bigint::oid AND objid = $2::bigint::oid AND objsubid = 1)
"""


class LeaderSession:
    """One dedicated connection that may hold the relay lock; `lost` is set when it closes."""

    def __init__(self, conn: asyncpg.Connection[Any], lock_key: int, timeout_s: float) -> None:
        self._conn = conn
        self._key = lock_key
        self._timeout_s = timeout_s
        self._held = False
        self._notify: NotifyCallback | None = None
        self.lost = asyncio.Event()
        self.pid = conn.get_server_pid()
        conn.add_termination_listener(self._on_terminated)

    @classmethod
    async def open(cls, connect: Connect, lock_key: int, timeout_s: float) -> LeaderSession:
        """Connect a new session (bounded by `timeout_s`)."""
        async with asyncio.timeout(timeout_s):
            conn = await connect()
        return cls(conn, lock_key, timeout_s)

    @property
    def fence(self) -> Fence:
        """What a claim checks to prove this session still holds the lock."""
        return Fence(pid=self.pid, key=self._key)

    async def try_acquire(self) -> bool:
        """Take the lock if nobody holds it; never waits for it."""
        acquired = bool(
            await self._conn.fetchval("SELECT pg_try_advisory_lock($1)", self._key, timeout=self._timeout_s)
        )
        self._held = acquired
        return acquired

    async def check(self) -> None:
        """Raise LeadershipLost unless the session is alive and still holds the lock."""
        if self.lost.is_set() or self._conn.is_closed():
            raise LeadershipLost("the lock connection is closed")
        try:
            fence = self.fence
            holds = await self._conn.fetchval(_HOLDS_LOCK, fence.classid, fence.objid, timeout=self._timeout_s)
        except POSTGRES_ERRORS as exc:
            raise LeadershipLost(f"the lock connection failed a check: {type(exc).__name__}") from exc
        if not holds:
            raise LeadershipLost("the lock session no longer holds the relay lock")

    async def listen(self, channel: str, on_notify: NotifyCallback) -> None:
        """Call `on_notify` for every NOTIFY on `channel` while the session lives."""
        self._notify = on_notify
        await self._conn.add_listener(channel, self._on_notification)

    async def close(self) -> None:
        """Release the lock if held, then close; a broken connection is just dropped."""
        conn = self._conn
        if conn.is_closed():
            return
        try:
            if self._held:
                # Unlock explicitly so a standby can take over before the socket closes.
                await conn.execute("SELECT pg_advisory_unlock($1)", self._key, timeout=self._timeout_s)
                self._held = False
            await conn.close(timeout=self._timeout_s)
        except POSTGRES_ERRORS as exc:
            logger.debug("lock connection did not close cleanly (%s); dropping it", type(exc).__name__)
            conn.terminate()
        except asyncio.CancelledError:
            conn.terminate()
            raise

    def _on_terminated(self, _conn: asyncpg.Connection[Any] | asyncpg.pool.PoolConnectionProxy[Any]) -> None:
        self.lost.set()

    def _on_notification(
        self,
        _conn: asyncpg.Connection[Any] | asyncpg.pool.PoolConnectionProxy[Any],
        _pid: int,
        _channel: str,
        _payload: object,
    ) -> None:
        if self._notify is not None:
            self._notify()
