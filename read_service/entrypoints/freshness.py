"""The freshness contract every query service of a replica shares.

- Readiness: until the projector that owns a view has caught up with the event log, the
  view may be empty or partial; queries answer UNAVAILABLE instead of presenting that as fact.
- Read your writes: a query carrying a consistency token waits (woken by the projector,
  within `max_wait_ms`, the server's cap and the caller's deadline) until the view reflects
  it; past the budget it answers with what it has, marked stale (`stale` field and the
  `x-tessera-stale` header).
- `view_position`: the checkpoint read from Redis just before the query's own read, or in the
  same command as the view (`answer_at`, one round trip for both).
- Budgets: every Redis read runs within the caller's remaining deadline, capped by
  QUERY_TIMEOUT_S (`within_budget`).

A servicer holds one `Freshness` per view it reads (one per projector) and calls
`require_ready`, `reflect` and `read` in that order.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from read_service.consistency import DEFAULT_MAX_WAIT_MS, PARKED_HEADER, STALE_HEADER, ConsistencyGate
from read_service.view_store import QueryCheckpoint
from shared_kernel.contracts import errors
from shared_kernel.contracts.consistency import ConsistencyToken

# The most a query waits for Redis when the caller's deadline allows more (QUERY_TIMEOUT_S).
DEFAULT_QUERY_TIMEOUT_S = 5.0
# Upper bound of the head start taken on the caller's deadline (see _deadline_margin).
DEADLINE_MARGIN_S = 0.05

T = TypeVar("T")

Context = grpc.aio.ServicerContext[Any, Any]


def _deadline_margin(remaining: float) -> float:
    # Give up a little before the caller's deadline, so that the caller receives this
    # service's DEADLINE_EXCEEDED and its reason instead of its own timer's bare one.
    return min(DEADLINE_MARGIN_S, remaining / 10)


async def within_budget(context: Context, work: Callable[[], Awaitable[T]], server_max_s: float) -> T:
    """Run `work` within the caller's remaining deadline and at most `server_max_s` seconds.

    When the caller's deadline is the tighter bound and runs out: DeadlineExceeded (its own
    choice, retrying the same call will not help). When the server's maximum runs out first:
    Unavailable, because the read model did not answer in time and another replica may.
    """
    remaining = context.time_remaining()
    caller_bound = remaining is not None and math.isfinite(remaining) and remaining < server_max_s
    budget = server_max_s
    if caller_bound:
        assert remaining is not None
        budget = remaining - _deadline_margin(remaining)
        if budget <= 0:
            # Not worth starting: the answer could not reach the caller in time.
            raise errors.DeadlineExceeded("the caller's deadline passed before the query started")
    timer = asyncio.timeout(budget)
    try:
        async with timer:
            return await work()
    except TimeoutError as exc:
        if not timer.expired():
            raise  # a driver's own timeout, not ours: mapped like any other driver error
        if caller_bound:
            raise errors.DeadlineExceeded(
                "the caller's deadline passed while the read model (Redis) was being queried"
            ) from exc
        raise errors.Unavailable(
            f"the read model (Redis) did not answer within {server_max_s:g} s; retry, possibly on another replica"
        ) from exc


class Freshness:
    """Readiness, consistency-token waits, view positions and query budgets for one view."""

    def __init__(
        self,
        is_ready: Callable[[], bool],
        query_timeout_s: float = DEFAULT_QUERY_TIMEOUT_S,
        *,
        gate: ConsistencyGate | None = None,
        checkpoint: Callable[[], Awaitable[int]] | None = None,
        max_wait_ms: int = DEFAULT_MAX_WAIT_MS,
    ) -> None:
        if query_timeout_s <= 0:
            raise ValueError("query_timeout_s must be positive")
        self._is_ready = is_ready
        self._query_timeout_s = query_timeout_s
        self._gate = gate
        self._checkpoint = checkpoint
        self._max_wait_s = max_wait_ms / 1000

    @property
    def query_timeout_s(self) -> float:
        """The server's cap on one Redis read."""
        return self._query_timeout_s

    def require_ready(self) -> None:
        """Raise Unavailable while the view's projector has not caught up with the event log."""
        # Before the first catch-up the views may be empty or partial: an empty answer would
        # be presented as fact, so refuse instead and let the caller retry another replica.
        if not self._is_ready():
            raise errors.Unavailable("the read model is catching up with the event log; retry shortly")

    async def reflect(self, token: ConsistencyToken | None, max_wait_ms: int, context: Context) -> tuple[bool, int]:
        """Wait for the request's consistency token; return (stale, view position) for the reply."""
        marked = await self._mark(token, max_wait_ms, context)
        return marked, await self._view_position(context)

    async def _mark(
        self, token: ConsistencyToken | None, max_wait_ms: int, context: Context, aggregate_id: str | None = None
    ) -> bool:
        """Wait for the token; send the stale and parked headers when they apply; return whether stale."""
        stale = False
        if token is not None:
            stale = not await self._wait_for(token, max_wait_ms, context)
        return await self._headers(stale, context, aggregate_id)

    async def _headers(self, stale: bool, context: Context, aggregate_id: str | None = None) -> bool:
        """Send the stale and parked headers when they apply; return whether the answer is stale."""
        # A parked projection (or aggregate) serves views exact up to the event before the parked
        # one, and says so.
        parked = None if self._gate is None else self._gate.parked_position(aggregate_id)
        if not stale and parked is None:
            return False
        headers = [(STALE_HEADER, "true")]
        if parked is not None:
            headers.append((PARKED_HEADER, str(parked)))
        await context.send_initial_metadata(tuple(headers))
        return True

    async def answer(
        self, context: Context, token: ConsistencyToken | None, max_wait_ms: int, work: Callable[[], Awaitable[T]]
    ) -> tuple[T, bool, int]:
        """What one query does: refuse while catching up, wait for the token, then read within the budget.

        Returns the read's result, whether the answer is stale, and the view position it reflects.
        """
        self.require_ready()
        stale, position = await self.reflect(token, max_wait_ms, context)
        return await self.read(context, work), stale, position

    async def answer_at(
        self,
        context: Context,
        token: ConsistencyToken | None,
        max_wait_ms: int,
        work: Callable[[QueryCheckpoint], Awaitable[T]],
        *,
        peek: Callable[[QueryCheckpoint], tuple[T] | None] | None = None,
        version: Callable[[T], int] | None = None,
        aggregate_id: str | None = None,
    ) -> tuple[T, bool, int]:
        """Like `answer`, for a read that takes the view position itself (see QueryCheckpoint).

        `peek` answers from memory without a Redis call when it can (a near-cache hit); it is
        tried before the read's budget is set up, also for a query with a consistency token
        when the cached view's `version` already reflects the token. With `version` (the aggregate version of what
        `work` read), a query with a consistency token checks the token against the value it
        read: when the view already reflects it, that read is the answer, so the query makes
        one Redis round trip (the checkpoint and the view in one command) instead of a version
        read and then the read. Otherwise the read is repeated each time the projector moves,
        as the wait would read the version, and the last one is the answer. `aggregate_id`: the
        aggregate the view shows, marked stale while its sequence is parked.
        """
        self.require_ready()
        if token is None:
            gate = self._gate
            # No coroutine for the headers unless something is parked (nearly every call).
            stale = (
                False
                if gate is None or gate.parked_position(aggregate_id) is None
                else await self._headers(False, context, aggregate_id)
            )
            at = QueryCheckpoint(self._checkpoint)
            if peek is not None:
                hit = peek(at)
                if hit is not None:
                    return hit[0], stale, at.position
            return await self.read(context, lambda: work(at)), stale, at.position
        if peek is not None and version is not None:
            # A near-cache entry exact at the projector's checkpoint that already reflects the
            # token answers it without Redis; one behind it falls through to the wait.
            at = QueryCheckpoint(self._checkpoint)
            hit = peek(at)
            if hit is not None and version(hit[0]) >= token.version:
                return hit[0], await self._headers(False, context), at.position
        at = QueryCheckpoint(self._checkpoint, memory=False)
        if version is None or self._gate is None:
            stale = await self._mark(token, max_wait_ms, context, aggregate_id)
            value = await self.read(context, lambda: work(at))
            return value, stale, at.position
        read: list[T] = []

        async def current(_aggregate_id: str) -> int:
            value = await self.read(context, lambda: work(at))
            read[:] = [value]
            return version(value)

        reflected = await self._wait_for(token, max_wait_ms, context, current)
        stale = await self._headers(not reflected, context, aggregate_id)
        if not read:  # pragma: no cover - the gate reads at least once
            read.append(await self.read(context, lambda: work(at)))
        return read[0], stale, at.position

    def from_memory(
        self, peek: Callable[[str, QueryCheckpoint], tuple[T] | None], aggregate_id: str
    ) -> tuple[T, int] | tuple[()] | None:
        """`(value, view position)` of a query without a consistency token, from memory.

        What `answer_at` answers for such a query when `peek` hits, without its steps. `()` when
        `peek` missed (the caller reads Redis; peeking again would only miss again). None when
        it did not peek: a view whose aggregate (or projection) is parked needs its headers
        sent, and a replica that is not ready refuses, so for both the caller goes through
        `answer_at`.
        """
        if not self._is_ready():
            return None
        gate = self._gate
        if gate is not None and gate.parked_position(aggregate_id) is not None:
            return None
        at = QueryCheckpoint(self._checkpoint)
        hit = peek(aggregate_id, at)
        return () if hit is None else (hit[0], at.position)

    async def read(self, context: Context, work: Callable[[], Awaitable[T]]) -> T:
        """Run one read of the view within the query budget."""
        return await within_budget(context, work, self._query_timeout_s)

    async def _view_position(self, context: Context) -> int:
        # Read from Redis before the query's own read: the checkpoint only moves forward, so the
        # answer reflects at least this position, whichever replica's projector wrote it.
        read = self._checkpoint
        if read is None:
            return 0
        return await within_budget(context, read, self._query_timeout_s)

    async def _wait_for(
        self,
        token: ConsistencyToken,
        max_wait_ms: int,
        context: Context,
        current: Callable[[str], Awaitable[int]] | None = None,
    ) -> bool:
        if self._gate is None:
            # Without a projector to wait on, the view cannot be shown to reflect anything.
            return False
        budget = self._max_wait_s if max_wait_ms == 0 else min(max_wait_ms / 1000, self._max_wait_s)
        remaining = context.time_remaining()
        if remaining is not None and math.isfinite(remaining):
            # Leave time for the read that follows the wait and for the answer to travel.
            budget = min(budget, remaining - 2 * _deadline_margin(remaining))
        return await self._gate.wait(token, max(budget, 0.0), current)
