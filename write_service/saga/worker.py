"""The saga worker loop: claim due sagas under a lease and drive them, several at once.

Claiming uses FOR UPDATE SKIP LOCKED, so any number of workers share the queue without
waiting on each other, and a lease (`locked_by`, `locked_until`): a saga whose worker died
keeps its lease until it runs out, then it is due again and the next claim resumes it at its
current step. The loop wakes on NOTIFY saga_due (a trigger fires it when a saga gets new
work), when a saga of its own finishes, at the next saga's due time, and at the polling
interval at the latest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import asyncpg

from write_service.saga.model import SagaRow
from write_service.saga.orchestrator import SagaRunner, saga_from_row

logger = logging.getLogger(__name__)

Connect: TypeAlias = "Callable[[], Awaitable[asyncpg.Connection[Any]]]"

SAGA_DUE_CHANNEL = "saga_due"

# What a lost or failing Postgres session raises (InternalClientError: asyncpg#1069).
POSTGRES_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)

_CLAIM = """
WITH due AS (
    SELECT id, locked_by AS previous_owner
    FROM saga_executions
    WHERE status IN ('running', 'compensating') AND next_attempt_at <= now()
      AND (locked_until IS NULL OR locked_until < now())
    ORDER BY next_attempt_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
),
claimed AS (
    UPDATE saga_executions AS s
    SET locked_by = $2, locked_until = now() + make_interval(secs => $3::float8)
    FROM due
    WHERE s.id = due.id
    RETURNING s.id, s.order_id, s.status, s.current_step, s.context::text AS context, s.version, s.attempts,
              s.locked_by, due.previous_owner
)
SELECT claimed.*, origin.correlation_id, origin.traceparent, origin.tracestate
FROM claimed
LEFT JOIN LATERAL (
    SELECT correlation_id, traceparent, tracestate FROM outbox
    WHERE aggregate_type = 'order' AND aggregate_id = claimed.order_id::text ORDER BY aggregate_version LIMIT 1
) AS origin ON true
"""

# Seconds until the next saga nobody holds falls due (or its lease runs out); NULL when none.
_NEXT_DUE = """
SELECT extract(epoch FROM min(greatest(next_attempt_at, coalesce(locked_until, next_attempt_at))) - now())
FROM saga_executions
WHERE status IN ('running', 'compensating') AND next_attempt_at IS NOT NULL
"""

_RELEASE_LEASES = "UPDATE saga_executions SET locked_by = NULL, locked_until = NULL WHERE locked_by = $1"


@dataclass
class WorkerStats:
    """Counters a worker keeps for its logs and tests."""

    claimed: int = 0
    resumed_stale: int = 0
    unexpected_errors: int = 0


class SagaWorker:
    """Claims due sagas and runs up to `concurrency` of them at once until `stop` is set."""

    def __init__(
        self,
        pool: asyncpg.Pool[Any],
        runner: SagaRunner,
        connect_listener: Connect,
        *,
        concurrency: int,
        lease_s: float,
        poll_interval_s: float,
    ) -> None:
        self._pool = pool
        self._runner = runner
        self._connect_listener = connect_listener
        self._concurrency = concurrency
        self._lease_s = lease_s
        self._poll_interval_s = poll_interval_s
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._listener: asyncpg.Connection[Any] | None = None
        self.stats = WorkerStats()

    @property
    def worker_id(self) -> str:
        """This worker's name in the lease columns."""
        return self._runner.worker_id

    async def run(self, stop: asyncio.Event, grace_s: float = 5.0) -> None:
        """Claim and drive sagas until `stop` is set; then let running steps finish within `grace_s`."""
        try:
            while not stop.is_set():
                await self._ensure_listener()
                self._wake.clear()
                if len(self._tasks) >= self._concurrency:
                    # Every slot is busy: a finishing saga sets the wake event.
                    await self._sleep(stop, self._poll_interval_s)
                    continue
                claimed = await self._claim_batch()
                if claimed and len(self._tasks) < self._concurrency:
                    continue  # there may be more due right now
                # A due row another transaction holds (SKIP LOCKED) reads as due now: do not spin on it.
                await self._sleep(stop, max(await self._next_wait(), 0.0 if claimed else 0.01))
        finally:
            self._runner.stopping = True
            await self._shutdown(grace_s)

    async def _claim_batch(self) -> int:
        free = self._concurrency - len(self._tasks)
        if free <= 0:
            return 0
        try:
            rows = await self._pool.fetch(_CLAIM, free, self.worker_id, self._lease_s)
        except POSTGRES_ERRORS as exc:
            logger.warning("claiming sagas failed (%s); retrying at the next poll", type(exc).__name__)
            return 0
        for row in rows:
            saga = saga_from_row(row)
            if row["correlation_id"] is not None:
                # The request that placed the order, read with the claim: the steps need not look it up.
                self._runner.remember_origin(
                    saga.order_id, (row["correlation_id"], row["traceparent"], row["tracestate"])
                )
            self.stats.claimed += 1
            if row["previous_owner"] is not None and row["previous_owner"] != self.worker_id:
                self.stats.resumed_stale += 1
                logger.info(
                    "resuming a stale saga at %s (lease of %s ran out)",
                    saga.current_step,
                    row["previous_owner"],
                    extra={"saga_id": str(saga.id)},
                )
            task = asyncio.create_task(self._drive(saga), name=f"saga-{saga.id}")
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
        return len(rows)

    async def _drive(self, saga: SagaRow) -> None:
        try:
            await self._runner.drive(saga)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.stats.unexpected_errors += 1
            logger.exception("saga step failed unexpectedly", extra={"saga_id": str(saga.id)})
            with contextlib.suppress(Exception):
                await self._runner.fail_unexpected(saga.id, exc)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._wake.set()

    async def _next_wait(self) -> float:
        try:
            seconds = await self._pool.fetchval(_NEXT_DUE)
        except POSTGRES_ERRORS:
            return self._poll_interval_s
        if seconds is None:
            return self._poll_interval_s
        return max(0.0, min(float(seconds) + 0.005, self._poll_interval_s))

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _ensure_listener(self) -> None:
        """LISTEN saga_due on a dedicated connection; polling covers the time it is down."""
        if self._listener is not None and not self._listener.is_closed():
            return
        try:
            conn = await self._connect_listener()
            await conn.add_listener(SAGA_DUE_CHANNEL, self._on_notify)
        except POSTGRES_ERRORS as exc:
            logger.warning("could not LISTEN %s (%s); polling meanwhile", SAGA_DUE_CHANNEL, type(exc).__name__)
            return
        self._listener = conn

    def _on_notify(self, *_args: object) -> None:
        self._wake.set()

    async def _shutdown(self, grace_s: float) -> None:
        """Let running steps finish within `grace_s`, cancel the rest, and hand their leases back."""
        started = time.monotonic()
        if self._tasks:
            # A step that ends its transaction now is as good as one never started: both are safe.
            _, pending = await asyncio.wait(list(self._tasks), timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=grace_s)
        try:
            await asyncio.wait_for(self._pool.execute(_RELEASE_LEASES, self.worker_id), timeout=5)
        except POSTGRES_ERRORS as exc:
            logger.warning("could not hand back leases (%s); they run out by themselves", type(exc).__name__)
        if self._listener is not None:
            with contextlib.suppress(*POSTGRES_ERRORS):
                await self._listener.close(timeout=5)
        logger.info("saga worker stopped", extra={"drain_s": round(time.monotonic() - started, 3)})
