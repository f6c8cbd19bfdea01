"""Events a projection cannot apply: record them, stop at them, and go on once an operator says so.

With projection parking (PARKING_MODE=projection) an event the projection raises on stops
the projection: nothing at or after its position is applied (the views stay exact as of the
position before it), the event and its error are recorded in Redis (read_service.generations),
logged and counted, and the projector waits until an operator skips it
(`python -m read_service.admin skip`) or the checkpoint moves past it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from read_service.applier import parked_record
from read_service.context import ProjectionContext, ProjectorState
from read_service.generations import ParkedEvent
from tessera.events.v1.envelope_pb2 import EventEnvelope

if TYPE_CHECKING:
    from read_service.catch_up import CatchUp

logger = logging.getLogger(__name__)


class Parking:
    """Parks one projection at a poison event and resumes it; see the module docstring."""

    def __init__(self, ctx: ProjectionContext) -> None:
        self._ctx = ctx
        # The last park logged (generation, position): a park found again is not a new one.
        self._logged: tuple[str, int] | None = None

    async def skipped(self, envelope: EventEnvelope, exc: BaseException) -> bool:
        """Whether an operator skipped the event the projection raised on (it then changes nothing)."""
        ctx = self._ctx
        skip = await ctx.meta.skipped(envelope.position)
        if skip is None:
            return False
        logger.warning(
            "applying nothing for the event at position %s: an operator skipped it",
            envelope.position,
            extra={"projection": ctx.name, "skip": skip, "error": str(exc)},
        )
        return True

    async def park(self, envelope: EventEnvelope, exc: BaseException) -> None:
        """Stop the projection at `envelope`: publish, record, log and count it."""
        ctx = self._ctx
        record = parked_record(ctx.name, ctx.generation or "", envelope, exc)
        ctx.parked = record
        ctx.state = ProjectorState.PARKED
        if self._logged != (record.generation, record.position):
            self._logged = (record.generation, record.position)
            ctx.counters.poison_events += 1
            logger.error(
                "projection parked at position %s: %s; nothing after it is applied until an operator skips it",
                record.position,
                record.error,
                extra={
                    "projection": record.projection,
                    "generation": record.generation,
                    "position": record.position,
                    "event_id": record.event_id,
                    "event_type": record.event_type,
                    "aggregate_type": record.aggregate_type,
                    "aggregate_id": record.aggregate_id,
                    "error": record.error,
                },
            )
            logger.debug("parked event's traceback", exc_info=exc)
        await ctx.meta.park(record)

    async def may_resume(self, checkpoint: int) -> bool:
        """True when the parked event was skipped, or another writer moved the checkpoint past it."""
        parked = self._ctx.parked
        return parked is not None and (
            checkpoint >= parked.position or await self._ctx.meta.skipped(parked.position) is not None
        )

    def _current(self) -> ParkedEvent | None:
        # Read through a call: the type checker would keep the narrowing above across the awaits.
        return self._ctx.parked

    async def resume(self, catch_up: CatchUp) -> None:
        """The parked event was skipped, or another writer moved past it: go on from the log."""
        ctx = self._ctx
        parked = ctx.parked
        if parked is None:
            return
        ctx.parked = None
        await catch_up.run(target=0)
        now = self._current()
        if now is None or now.position != parked.position:
            await ctx.meta.unpark(parked.generation)
            logger.info(
                "resumed after the parked event at position %s",
                parked.position,
                extra={"projection": ctx.name, "checkpoint": ctx.checkpoint},
            )
            if now is not None:
                await ctx.meta.park(now)
