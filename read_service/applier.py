"""Projecting a run of events: the one place that turns events into effects and stops at a poison event.

Live apply and catch-up (read_service.projector), a rebuild (read_service.rebuild) and a
watch's replay of an event from the log (read_service.watch) all project through
`project_run`. A batch of one is still a batch. For each event of the run, in order:

- an event of a type the projection does not handle (`Projection.handles`) is not projected:
  its effect is empty, and its position only moves the checkpoint;
- otherwise the projection computes the effect from the state the earlier events of the run
  leave behind (`overlay`, updated in place, so that nothing has to reach Redis in between);
- an event the projection raises on is either skipped (the caller says so: an operator
  skipped it, or the checkpoint is already past it) and changes nothing, or it is parked.
  With projection parking it ends the run: the caller applies the effects before it and parks
  it (read_service.generations.ParkedEvent). With aggregate parking (`sequences`, decision
  0029) it parks its aggregate and the run goes on; an event of an aggregate parked already is
  held behind it. Either way its effect is only the update of the parked record.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from read_service.generations import ParkedEvent
from read_service.projections.base import Effect, Projection
from tessera.events.v1.envelope_pb2 import EventEnvelope

if TYPE_CHECKING:
    from read_service.sequences import ParkedSequences

# Events projected between two chances for the loop's other tasks to run.
YIELD_EVERY = 200

# The effect of an event the projection does not handle, or of a skipped one.
NO_EFFECT = Effect()

# Whether the event the projection raised on (with that error) is skipped rather than parked.
SkipCheck = Callable[[EventEnvelope, BaseException], Awaitable[bool]]
# Called with each event and its effect, before anything of it is written.
EffectListener = Callable[[EventEnvelope, Effect], None]


@dataclass(slots=True)
class Projected:
    """What projecting a run gave: each event's effect in order, up to the poison event if any."""

    effects: list[tuple[EventEnvelope, Effect]] = field(default_factory=list)
    # The event the projection raised on and was not skipped (nothing at or after it is in `effects`).
    poison: EventEnvelope | None = None
    error: BaseException | None = None
    # Aggregate parking: the error of each event that parked its aggregate, by position.
    errors: dict[int, BaseException] = field(default_factory=dict)


def handles(projection: Projection, envelope: EventEnvelope) -> bool:
    """True when `projection` handles events of the envelope's type (a projection without a list handles all)."""
    handled: frozenset[str] | None = getattr(projection, "handles", None)
    return handled is None or envelope.event_type in handled


async def project_run(
    projection: Projection,
    run: Iterable[EventEnvelope],
    overlay: dict[str, bytes | None],
    *,
    skipped: SkipCheck,
    listeners: Sequence[EffectListener] = (),
    before_project: Callable[[EventEnvelope], None] | None = None,
    sequences: ParkedSequences | None = None,
) -> Projected:
    """Project `run` in order from `overlay` (updated in place); see the module docstring.

    `before_project` is called with each event the projection is about to project (the
    projector opens its span there). `sequences`: park per aggregate rather than stop.
    """
    projected = Projected()
    handled: frozenset[str] | None = getattr(projection, "handles", None)
    for count, envelope in enumerate(run, start=1):
        if not count % YIELD_EVERY:
            # A long run (a catch-up page) must not hold the loop: the applying lease is
            # renewed, and queries answered, by other tasks of this loop.
            await asyncio.sleep(0)
        if handled is not None and envelope.event_type not in handled:
            effect = NO_EFFECT
        elif sequences is not None and sequences.holding(envelope):
            effect = sequences.hold(envelope)
        else:
            if before_project is not None:
                before_project(envelope)
            try:
                effect = projection.project(envelope, overlay)
            except Exception as exc:
                if await skipped(envelope, exc):
                    effect = NO_EFFECT
                elif sequences is not None:
                    effect = sequences.park(envelope, exc)
                    projected.errors[envelope.position] = exc
                else:
                    projected.poison = envelope
                    projected.error = exc
                    return projected
            overlay.update(effect.state)
        for listener in listeners:
            listener(envelope, effect)
        projected.effects.append((envelope, effect))
    return projected


def parked_record(projection: str, generation: str, envelope: EventEnvelope, exc: BaseException) -> ParkedEvent:
    """The record of `envelope` parked in `generation` of `projection` because of `exc`."""
    return ParkedEvent(
        projection=projection,
        generation=generation,
        position=envelope.position,
        event_id=envelope.event_id,
        event_type=envelope.event_type,
        aggregate_type=envelope.aggregate_type,
        aggregate_id=envelope.aggregate_id,
        error=f"{type(exc).__name__}: {exc}",
        parked_at=datetime.now(UTC).isoformat(),
    )
