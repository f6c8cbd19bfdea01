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
from shared_kernel.contracts.event_log import head_position, read_positioned
from shared_kernel.platform.runtime import cancel_and_wait

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
            while checkpoint < head:
                events = await read_positioned(ctx.pool, checkpoint, ctx.options.batch_size, up_to=head)
                if not events:
                    break
                await guard
                advanced = await self._batches.apply(events)
                if ctx.is_parked():
                    break
                if advanced == checkpoint:
                    # The log has a hole right after the checkpoint (a position not committed
                    # yet); retry below rather than spin on the same read.
                    break
                checkpoint = advanced
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
