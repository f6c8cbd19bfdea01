"""The relay's metrics: events published (a counter, per batch) and the outbox backlog (sampled gauges).

  tessera.relay.published      counter: events this relay published (re-publications included)
  tessera.relay.head           gauge: highest position this relay knows to be published
  tessera.relay.backlog        gauge: outbox rows not yet published, by stage:
                               stage=unpositioned (committed, waiting for a position) and
                               stage=positioned (positioned, above the published watermark)

The backlog comes from a count of `outbox_pending`, the ids waiting for a position (it
stays small however long the outbox grows) and relay_state's two positions, sampled every
METRICS_SAMPLE_INTERVAL_S by every relay, active or standby, so the figure survives a
failover. In Prometheus: tessera_relay_published_total, tessera_relay_backlog.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import asyncpg
from opentelemetry import metrics

from shared_kernel.platform.metrics import Sampler, attrs

METER_NAME = "tessera.relay"

_BACKLOG = """
SELECT (SELECT count(*) FROM outbox_pending) AS unpositioned,
       (SELECT last_position - published_position FROM relay_state WHERE singleton) AS positioned
"""

_published = metrics.get_meter(METER_NAME).create_counter(
    "tessera.relay.published", unit="{event}", description="Events published to Redis pub/sub by this relay"
)


def record_published(count: int) -> None:
    """Count `count` events published in one batch (one call per batch, not per event)."""
    _published.add(count)


def backlog_sampler(pool: asyncpg.Pool[Any], interval_s: float) -> Sampler:
    """A sampler of the unpublished outbox rows, by stage."""

    async def fetch() -> Mapping[tuple[tuple[str, str], ...], float]:
        row = await pool.fetchrow(_BACKLOG, timeout=max(interval_s, 1.0))
        assert row is not None
        return {
            attrs(stage="unpositioned"): float(row["unpositioned"]),
            attrs(stage="positioned"): float(row["positioned"]),
        }

    return Sampler("relay-backlog", fetch, interval_s)


def register_relay_metrics(
    backlog: Sampler, published_head: Callable[[], int], meter_provider: metrics.MeterProvider | None = None
) -> None:
    """Expose the sampled backlog and the relay's published head as observable gauges."""
    meter = metrics.get_meter(METER_NAME, meter_provider=meter_provider)

    def head(_options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        return [metrics.Observation(published_head())]

    meter.create_observable_gauge(
        "tessera.relay.backlog",
        [backlog.observe],
        unit="{event}",
        description="Outbox rows not yet published, by stage (unpositioned, positioned)",
    )
    meter.create_observable_gauge(
        "tessera.relay.head",
        [head],
        description="Highest outbox position this relay knows to be published",
    )
