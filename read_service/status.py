"""A snapshot of one projector's state and counters, for health, metrics, logs and tests."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from read_service.context import ProjectionContext, ProjectorState
from read_service.generations import ParkedEvent


@dataclass(frozen=True, slots=True)
class ProjectorStatus:
    """A snapshot of the projector, for health, logs and tests."""

    projection: str
    state: ProjectorState
    ready: bool
    checkpoint: int
    head: int
    last_applied_at: datetime | None
    applied: int
    duplicates: int
    catch_ups: int
    reconnects: int
    # Events parked since start (each position counted once), and the one parked now, if any.
    poison_events: int
    parked: ParkedEvent | None = None
    # Times the event log was found rewound under the views (read_service.rewind).
    log_rewinds: int = 0
    generation: str | None = None
    # With the applying lease (read_service.lease): whether this projector applies, and who does.
    applying: bool = True
    lease_holder: str | None = None
    # When the newest applied event happened (its envelope's occurred_at), for lag in seconds.
    last_applied_occurred_at: datetime | None = None
    # Aggregates whose sequences are parked now (aggregate parking).
    parked_aggregates: int = 0
    # The highest position the projector is done with: the checkpoint, or past it the events it
    # ignores whose marker is not written yet (they are not behind: nothing is left to apply).
    seen: int = 0


def snapshot(ctx: ProjectionContext) -> ProjectorStatus:
    """The status of the projector running `ctx`."""
    counters = ctx.counters
    last = counters.last_applied_envelope
    lease = ctx.lease
    return ProjectorStatus(
        projection=ctx.name,
        state=ctx.state,
        ready=ctx.published.ready,
        checkpoint=ctx.checkpoint,
        head=counters.head,
        last_applied_at=counters.last_applied_at,
        applied=counters.applied,
        duplicates=counters.duplicates,
        catch_ups=counters.catch_ups,
        reconnects=counters.reconnects,
        poison_events=counters.poison_events,
        parked=ctx.parked,
        log_rewinds=counters.log_rewinds,
        generation=ctx.generation,
        applying=lease is None or lease.held,
        lease_holder=None if lease is None else lease.holder,
        last_applied_occurred_at=None if last is None else last.occurred_at.ToDatetime(tzinfo=UTC),
        parked_aggregates=len(ctx.published.parked_aggregates),
        seen=ctx.seen(),
    )
