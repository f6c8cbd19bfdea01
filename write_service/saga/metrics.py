"""The saga worker's metrics: sagas by status, sampled from the database.

  tessera.saga.executions  gauge: saga executions by status (running, compensating,
                           completed, failed); every status is reported, 0 when none.

One grouped COUNT every METRICS_SAMPLE_INTERVAL_S (the status index serves it); every
worker samples the same table, so a dashboard takes max() over workers, not sum(). In
Prometheus: tessera_saga_executions{status="failed"}.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import asyncpg
from opentelemetry import metrics

from shared_kernel.platform.metrics import Sampler, attrs
from write_service.saga import model

METER_NAME = "tessera.saga"
STATUSES = (model.RUNNING, model.COMPENSATING, model.COMPLETED, model.FAILED)

_BY_STATUS = "SELECT status, count(*) AS n FROM saga_executions GROUP BY status"


def saga_status_sampler(pool: asyncpg.Pool[Any], interval_s: float) -> Sampler:
    """A sampler of saga executions by status."""

    async def fetch() -> Mapping[tuple[tuple[str, str], ...], float]:
        rows = await pool.fetch(_BY_STATUS, timeout=max(interval_s, 1.0))
        counts = {status: 0.0 for status in STATUSES}
        for row in rows:
            counts[row["status"]] = float(row["n"])
        return {attrs(status=status): n for status, n in counts.items()}

    return Sampler("saga-status", fetch, interval_s)


def register_saga_metrics(sampler: Sampler, meter_provider: metrics.MeterProvider | None = None) -> None:
    """Expose the sampled saga counts as an observable gauge."""
    meter = metrics.get_meter(METER_NAME, meter_provider=meter_provider)
    meter.create_observable_gauge(
        "tessera.saga.executions",
        [sampler.observe],
        description="Saga executions by status, sampled from the database",
    )
