"""Read your writes: waiting until a replica's view reflects a consistency token.

A query that carries a token is answered once the view of the token's aggregate has at
least the token's version. The wait is woken by the projector after each applied batch
(`ViewProgress.changed`), never by a timer; when the budget runs out the query is answered
with what the replica has and marked stale. A version that can never arrive (the event log
holds fewer versions of the aggregate) is refused promptly instead: the log is asked once the
wait has lasted LOG_CHECK_AFTER_S, and once more when it times out. Not at once: a token
handed out a moment ago is usually applied within a few milliseconds, and asking Postgres
for every such query cost the replica a round trip per read-your-writes call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import asyncpg

from shared_kernel.contracts import errors
from shared_kernel.contracts.consistency import FIELD, ConsistencyToken, decode_token

USER_AGGREGATE = "user"
PRODUCT_AGGREGATE = "product"
ORDER_AGGREGATE = "order"
STALE_HEADER = "x-tessera-stale"
# Set (to the position) when the view's projection, or the aggregate's sequence, is parked at an
# event: the answer reflects the log only up to the position before it (decisions 0016, 0029).
PARKED_HEADER = "x-tessera-parked"
DEFAULT_MAX_WAIT_MS = 5000
# How long a token's wait lasts before the event log is asked whether its version exists.
LOG_CHECK_AFTER_S = 0.05


class ViewProgress(Protocol):
    """How far a projection has got, and a way to be told when it moves."""

    @property
    def checkpoint(self) -> int:
        """The position of the last event the views reflect."""

    def changed(self) -> asyncio.Event:
        """An event set the next time the checkpoint moves (a fresh one after each move)."""


VersionReader = Callable[[str, str], Awaitable[int]]


def log_versions(pool: asyncpg.Pool[Any]) -> VersionReader:
    """Reads the highest version of an aggregate in the Postgres event log (0 when it has none)."""

    async def latest(aggregate_type: str, aggregate_id: str) -> int:
        value = await pool.fetchval(
            "SELECT max(aggregate_version) FROM outbox WHERE aggregate_type = $1 AND aggregate_id = $2",
            aggregate_type,
            aggregate_id,
        )
        return int(value or 0)

    return latest


def token_for(aggregate_type: str, token: str) -> ConsistencyToken | None:
    """The request's token decoded (None when empty); InvalidArgument when garbage or for another aggregate type."""
    if not token:
        return None
    decoded = decode_token(token)
    if decoded.aggregate_type != aggregate_type:
        raise errors.InvalidArgument.single(
            FIELD, f"names a {decoded.aggregate_type} but this service serves {aggregate_type} views"
        )
    return decoded


def user_token(token: str) -> ConsistencyToken | None:
    """The request's token decoded (None when empty); InvalidArgument when it is garbage or not a user's."""
    return token_for(USER_AGGREGATE, token)


class ConsistencyGate:
    """Waits, within a budget, until the views reflect a token."""

    def __init__(
        self,
        progress: ViewProgress,
        current_version: Callable[[str], Awaitable[int]],
        log_version: VersionReader,
    ) -> None:
        self._progress = progress
        self._current_version = current_version
        self._log_version = log_version

    def parked_position(self, aggregate_id: str | None = None) -> int | None:
        """Where the view stops: the projection's parked event, or `aggregate_id`'s (None when neither is parked)."""
        of = getattr(self._progress, "parked_position", None)
        if of is not None:
            position: int | None = of(aggregate_id)
            return position
        parked = getattr(self._progress, "parked", None)
        return None if parked is None else int(parked.position)

    async def wait(
        self, token: ConsistencyToken, budget_s: float, current: Callable[[str], Awaitable[int]] | None = None
    ) -> bool:
        """True once the views reflect `token`; False (stale) when `budget_s` runs out first.

        `current` reads the aggregate's version instead of the gate's own reader (a query that
        reads its whole answer each time and keeps the last one). Raises FailedPrecondition when
        the event log shows the version can never arrive.
        """
        current_version = self._current_version if current is None else current
        started = time.monotonic()
        deadline = started + budget_s
        check_log_at: float | None = started + min(LOG_CHECK_AFTER_S, budget_s)
        while True:
            # Take the event before reading, so a move between the read and the wait still wakes us.
            changed = self._progress.changed()
            if await current_version(token.aggregate_id) >= token.version:
                return True
            now = time.monotonic()
            if check_log_at is not None and now >= check_log_at:
                await self._check_exists(token)
                check_log_at = None
            remaining = deadline - now
            if remaining <= 0:
                await self._check_exists(token)
                return False
            wake_at = deadline if check_log_at is None else min(deadline, check_log_at)
            try:
                async with asyncio.timeout(wake_at - now):
                    await changed.wait()
            except TimeoutError:
                if wake_at < deadline:
                    continue  # time to ask the log, not the end of the budget
                # One last look: the apply may have landed just as the budget ran out.
                if await current_version(token.aggregate_id) >= token.version:
                    return True
                await self._check_exists(token)
                return False

    async def _check_exists(self, token: ConsistencyToken) -> None:
        latest = await self._log_version(token.aggregate_type, token.aggregate_id)
        if latest < token.version:
            raise errors.FailedPrecondition(
                f"consistency token refers to version {token.version} of {token.aggregate_type} "
                f"{token.aggregate_id}, which does not exist (current version {latest})"
            )
