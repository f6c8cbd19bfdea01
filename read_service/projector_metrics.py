"""The projectors' progress as OpenTelemetry metrics: checkpoint, lag, parked events, duplicates.

Observable instruments read each projector's status when a metrics reader collects, so
nothing is counted on the apply path. With no metrics SDK configured the API's no-op
meter makes this free.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from opentelemetry import metrics

from read_service.projector import Projector, ProjectorStatus

METER_NAME = "tessera.read_service.projector"


def status_observations(
    projectors: Sequence[Projector], value: Callable[[ProjectorStatus], int]
) -> list[metrics.Observation]:
    """One observation per projector, labelled with its projection."""
    observed = []
    for projector in projectors:
        status = projector.status()
        observed.append(metrics.Observation(value(status), {"projection": status.projection}))
    return observed


def register_projector_metrics(
    projectors: Sequence[Projector], meter_provider: metrics.MeterProvider | None = None
) -> None:
    """Expose every projector's progress and parked state through the OpenTelemetry metrics API."""
    meter = metrics.get_meter(METER_NAME, meter_provider=meter_provider)

    def observe(
        value: Callable[[ProjectorStatus], int],
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
        [observe(lambda s: max(s.head - s.checkpoint, 0))],
        description="Events the projection is behind the highest position this replica has seen",
    )
    meter.create_observable_gauge(
        "tessera.read.projection.parked_position",
        [observe(lambda s: 0 if s.parked is None else s.parked.position)],
        description="Position of the event the projection is parked at (0: none)",
    )
    meter.create_observable_counter(
        "tessera.read.projection.parked_events",
        [observe(lambda s: s.poison_events)],
        description="Events parked since start (each position once)",
    )
    meter.create_observable_counter(
        "tessera.read.projection.duplicates",
        [observe(lambda s: s.duplicates)],
        description="Deliveries skipped because the event was already applied",
    )
