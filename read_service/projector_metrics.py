"""The projectors' progress as OpenTelemetry metrics: checkpoint, lag, parked events, duplicates.

Lag has two gauges per projection:
  tessera.read.projection.behind       positions: the highest position this replica has seen
                                       (events, relay heartbeats) minus its checkpoint
  tessera.read.projection.lag_seconds  0 when caught up; while behind, the age of the newest
                                       applied event (now minus its occurred_at), i.e. how old the
                                       state the views show may be. Not reported while behind
                                       before the first apply (unknown).

Observable instruments read each projector's status when a metrics reader collects, so
nothing is counted on the apply path. With no metrics SDK configured the API's no-op
meter makes this free.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime

from opentelemetry import metrics

from read_service.projector import Projector, ProjectorStatus

METER_NAME = "tessera.read_service.projector"


def status_observations(
    projectors: Sequence[Projector], value: Callable[[ProjectorStatus], float | None]
) -> list[metrics.Observation]:
    """One observation per projector, labelled with its projection (none where `value` gives None)."""
    observed = []
    for projector in projectors:
        status = projector.status()
        measured = value(status)
        if measured is not None:
            observed.append(metrics.Observation(measured, {"projection": status.projection}))
    return observed


def lag_seconds(status: ProjectorStatus, now: datetime | None = None) -> float | None:
    """0 when caught up; else the age of the newest applied event (None when nothing was applied yet)."""
    if max(status.checkpoint, status.seen) >= status.head:
        return 0.0
    if status.last_applied_occurred_at is None:
        return None
    age = ((now or datetime.now(UTC)) - status.last_applied_occurred_at).total_seconds()
    return max(age, 0.0)


def register_projector_metrics(
    projectors: Sequence[Projector], meter_provider: metrics.MeterProvider | None = None
) -> None:
    """Expose every projector's progress and parked state through the OpenTelemetry metrics API."""
    meter = metrics.get_meter(METER_NAME, meter_provider=meter_provider)

    def observe(
        value: Callable[[ProjectorStatus], float | None],
    ) -> Callable[[metrics.CallbackOptions], Iterable[metrics.Observation]]:
        def callback(_options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
            return status_observations(projectors, value)

        return callback

    meter.create_observable_gauge(
        "tessera.read.projection.checkpoint",
        [observe(lambda s: s.checkpoint)],
        description="Position of the last event applied to the projection's views",
    )
    meter.create_observable_gauge(
        "tessera.read.projection.behind",
        [observe(lambda s: max(s.head - max(s.checkpoint, s.seen), 0))],
        description="Events the projection is behind the highest position this replica has seen",
    )
    meter.create_observable_gauge(
        "tessera.read.projection.head",
        [observe(lambda s: s.head)],
        description="Highest event position this replica has seen announced or delivered",
    )
    meter.create_observable_gauge(
        "tessera.read.projection.lag_seconds",
        [observe(lag_seconds)],
        unit="s",
        description="0 when caught up; while behind, the age of the newest event applied to the views",
    )
    meter.create_observable_gauge(
        "tessera.read.projection.parked_position",
        [observe(lambda s: 0 if s.parked is None else s.parked.position)],
        description="Position of the event the projection is parked at (0: none)",
    )
    meter.create_observable_gauge(
        "tessera.read.projection.parked_aggregates",
        [observe(lambda s: s.parked_aggregates)],
        description="Aggregates whose events wait behind a parked one (aggregate parking, decision 0029)",
    )
    meter.create_observable_counter(
        "tessera.read.projection.parked_events",
        [observe(lambda s: s.poison_events)],
        description="Events parked since start (each position once)",
    )
    meter.create_observable_counter(
        "tessera.read.projection.log_rewinds",
        [observe(lambda s: s.log_rewinds)],
        description="Times the event log was found rewound under the views (a failover lost events): views rebuilt",
    )
    meter.create_observable_counter(
        "tessera.read.projection.duplicates",
        [observe(lambda s: s.duplicates)],
        description="Deliveries skipped because the event was already applied",
    )
