"""Catch-up: apply the Postgres event log from the checkpoint to its head.

Redis pub/sub is at-most-once; the log is the durable source. A session catches up when it
starts (after subscribing, so nothing falls between the two), and again whenever the stream
shows a gap: a live event ahead of the checkpoint + 1, a StreamHead heartbeat ahead of what was
seen, a re-subscription after a silent reconnect, or an overflow of the inbox. Catch-up reads
the log in batches and applies each through the batch applier, so it obeys the same rules as
live apply (decision 0004).
"""

from __future__ import annotations

import asyncio
import logging
import time

from read_service.batches import BatchApplier
from read_service.context import ProjectionContext, ProjectorState
from read_service.rewind import RewindGuard
from shared_kernel.contracts.event_log import ENVELOPE_COLUMNS, envelope_from_row, head_position, read_positioned
from shared_kernel.platform.runtime import cancel_and_wait
from tessera.events.v1.envelope_pb2 import EventEnvelope

logger = logging.getLogger(__name__)


class CatchUp:
    """Catches one projection up with the event log; see the module docstring."""

    def __init__(self, ctx: ProjectionContext, batches: BatchApplier, guard: RewindGuard) -> None:
        self._ctx = ctx
        self._batches = batches
        self._guard = guard

    async def run(self, target: int, building: bool = False) -> None:
        """Apply the log from the checkpoint to its head, and to at least `target`.

        `building`: a new generation is being built; readiness waits for the switch.
        """
        ctx = self._ctx
        if ctx.is_parked():
            return
        ctx.state = ProjectorState.CATCHING_UP
        ctx.counters.catch_ups += 1
        started = time.monotonic()
        # The views may hold events the log has lost since (a failover). The check runs beside
        # the first reads, so the head is read as early as without it, and is settled before
        # anything is applied.
        guard = asyncio.ensure_future(self._guard.check())
        try:
            await self._apply_log(target, guard)
            await guard
        finally:
            if not guard.done():
                await cancel_and_wait([guard])
        logger.debug(
            "caught up",
            extra={
                "projection": ctx.name,
                "checkpoint": ctx.checkpoint,
                "elapsed_s": round(time.monotonic() - started, 3),
            },
        )
        if ctx.is_parked():
            # The views are exact as of the position before the parked event: they keep being
            # served, and the queries that read them say so (see read_service.generations).
            ctx.state = ProjectorState.PARKED
        else:
            ctx.state = ProjectorState.LIVE
        if not building:
            await ctx.set_ready(True)

    async def _apply_log(self, target: int, guard: asyncio.Future[int]) -> None:
        """Read and apply the log from the checkpoint to its head (and to `target`), after `guard`."""
        ctx = self._ctx
        gap_deadline: float | None = None
        while True:
            checkpoint = await ctx.store.checkpoint()
            await ctx.observe_checkpoint(checkpoint)
            head = max(await head_position(ctx.pool), target)
            ctx.counters.head = max(ctx.counters.head, head)
            pages = _Pages(ctx, checkpoint, head)
            try:
                while checkpoint < head:
                    events, covers = await pages.next()
                    if not events and covers is None:
                        break
                    await guard
                    advanced = await self._batches.apply(events, covers=covers)
                    if ctx.is_parked():
                        break
                    if advanced == checkpoint:
                        # The log has a hole right after the checkpoint (a position not committed
                        # yet); retry below rather than spin on the same read.
                        break
                    checkpoint = advanced
            finally:
                await pages.close()
            if checkpoint >= target or ctx.is_parked():
                return
            # A live event may be ahead of what the log shows: the relay publishes right
            # after it commits, so the rows appear within moments.
            if gap_deadline is None:
                gap_deadline = time.monotonic() + ctx.options.gap_wait_s
            if time.monotonic() >= gap_deadline:
                logger.warning(
                    "event log does not reach position %s yet; will retry on the next message",
                    target,
                    extra={"projection": ctx.name, "checkpoint": checkpoint},
                )
                return
            await asyncio.sleep(0.05)


class _Pages:
    """The log from a checkpoint to a head, page by page, the next page read while one is applied.

    While the projection is not ready (starting, or rebuilding a lost Redis), nobody reads its
    change feed's effects for events it does not handle, and positions up to the head have no
    holes (the relay positions rows and moves the head in one transaction): each page then holds
    only the events of the types the projection handles (and the event at the head), and says
    which positions it covers, so that the checkpoint moves over the rest without reading them.
    Otherwise a page is every event, up to the first hole (covering None).
    """

    def __init__(self, ctx: ProjectionContext, checkpoint: int, head: int) -> None:
        self._ctx = ctx
        self._head = head
        batch = ctx.options.batch_size
        self._size = max(ctx.options.catch_up_page, batch) if head - checkpoint > batch else batch
        handled: frozenset[str] | None = getattr(ctx.projection, "handles", None)
        self._types = None if ctx.published.ready or handled is None else sorted(handled)
        self._after = checkpoint
        self._ahead: asyncio.Task[tuple[list[EventEnvelope], tuple[int, int] | None]] | None = None

    async def next(self) -> tuple[list[EventEnvelope], tuple[int, int] | None]:
        """The next page and the positions (first, last) it covers (None: its events, up to a hole)."""
        ahead, self._ahead = self._ahead, None
        events, covers = await (ahead if ahead is not None else self._read(self._after))
        reached = covers[1] if covers is not None else events[-1].position if events else self._after
        self._after = reached
        if events and reached < self._head:
            # Postgres reads the next page while this one is projected and written.
            self._ahead = asyncio.create_task(self._read(reached))
        return events, covers

    async def close(self) -> None:
        """Drop a page read ahead and not used."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            await cancel_and_wait([ahead])
            if not ahead.cancelled() and ahead.exception() is not None:
                logger.debug("a page read ahead failed: %s", ahead.exception())

    async def _read(self, after: int) -> tuple[list[EventEnvelope], tuple[int, int] | None]:
        ctx = self._ctx
        if self._types is None:
            return await read_positioned(ctx.pool, after, self._size, up_to=self._head), None
        rows = await ctx.pool.fetch(_HANDLED, after, self._head, self._types, self._size)
        events = [envelope_from_row(row) for row in rows]
        # A full page reaches its last event; a short one reaches the head, and holds the event
        # there whatever its type: the fingerprint stored with the write (read_service.log_guard)
        # is the event at the position the checkpoint reaches, as on every other path.
        return events, (after + 1, events[-1].position if len(events) == self._size else self._head)


_HANDLED = (
    f"SELECT {ENVELOPE_COLUMNS} FROM outbox "  # noqa: S608 - fixed columns, bound values
    "WHERE position > $1 AND position <= $2 AND (event_type = ANY($3::text[]) OR position = $2) "
    "ORDER BY position LIMIT $4"
)
