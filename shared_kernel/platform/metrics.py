"""OpenTelemetry metrics for one process: a MeterProvider with a Prometheus endpoint and/or OTLP export.

`configure_metrics` is called once in each process's `__main__`, before the components
that create instruments. It reads `MetricsSettings` and the standard OTEL_* variables:

* METRICS_PORT set: a Prometheus scrape endpoint at http://METRICS_HOST:PORT/metrics
  (127.0.0.1 by default; port 0 picks a free port, logged as "metrics endpoint listening").
* OTEL_METRICS_EXPORTER naming `otlp`: a periodic OTLP/gRPC export (the exporter reads
  OTEL_EXPORTER_OTLP_* and OTEL_METRIC_EXPORT_INTERVAL), when
  opentelemetry-exporter-otlp-proto-grpc is installed.

With neither, no provider is installed: the API's no-op meter keeps every instrument free,
`metrics_enabled()` is False, and components skip what exists only to feed metrics (the
per-call RPC recorder, database samplers).

Gauges that need a database query (relay backlog, saga states) cannot query from an
observable callback, which runs synchronously in the exporter's thread: a `Sampler` task
refreshes their values every METRICS_SAMPLE_INTERVAL_S and the callback reads the last sample.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from shared_kernel.platform.settings import MetricsSettings

logger = logging.getLogger(__name__)

# Latency buckets in seconds: sub-millisecond cache hits up to calls that hit their deadline.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class ProcessMetrics:
    """What `configure_metrics` installed; `shutdown()` flushes and stops it (safe when nothing was)."""

    provider: MeterProvider | None = None
    endpoint: str | None = None
    settings: MetricsSettings = field(default_factory=MetricsSettings)
    _http_server: Any = None

    @property
    def enabled(self) -> bool:
        """Whether a reader collects this process's instruments."""
        return self.provider is not None

    def shutdown(self) -> None:
        """Stop the scrape endpoint and flush and stop the exporters."""
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None
        if self.provider is not None:
            self.provider.shutdown()


_current = ProcessMetrics()


def metrics_enabled() -> bool:
    """Whether this process configured a metrics reader (instruments are no-ops otherwise)."""
    return _current.enabled


def current() -> ProcessMetrics:
    """The process's metrics configuration (disabled until `configure_metrics` installs one)."""
    return _current


def _otlp_readers() -> list[MetricReader]:
    names = [n.strip() for n in os.environ.get("OTEL_METRICS_EXPORTER", "").split(",") if n.strip()]
    readers: list[MetricReader] = []
    for name in names:
        if name in ("none", "prometheus"):
            # `prometheus` is served by METRICS_PORT; naming it here alone changes nothing.
            continue
        if name == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                    OTLPMetricExporter,
                )
            except ImportError:
                logger.warning("OTEL_METRICS_EXPORTER=otlp but opentelemetry-exporter-otlp-proto-grpc is not installed")
                continue
            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        elif name == "console":
            from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
        else:
            logger.warning("unknown OTEL_METRICS_EXPORTER %r ignored", name)
    return readers


def configure_metrics(
    service_name: str,
    settings: MetricsSettings | None = None,
    *,
    port_offset: int = 0,
    extra_readers: Iterable[MetricReader] = (),
) -> ProcessMetrics:
    """Install this process's MeterProvider from settings and OTEL_* variables; call once, early.

    `port_offset` is added to a non-zero METRICS_PORT (read workers sharing one environment
    each serve their own endpoint); `extra_readers` lets tests collect in memory.
    """
    global _current  # noqa: PLW0603 - one provider per process, like the tracer provider
    settings = settings or MetricsSettings()
    readers: list[MetricReader] = [*_otlp_readers(), *extra_readers]
    http_server = None
    endpoint = None
    if settings.metrics_port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry()
        readers.append(PrometheusMetricReader(registry=registry))
        port = settings.metrics_port + port_offset if settings.metrics_port else 0
        try:
            http_server, _thread = start_http_server(port, addr=settings.metrics_host, registry=registry)
        except OSError as exc:
            raise RuntimeError(
                f"METRICS_HOST/METRICS_PORT: cannot serve metrics on {settings.metrics_host}:{port}: {exc}"
            ) from exc
        endpoint = f"http://{_url_host(settings.metrics_host)}:{http_server.server_port}/metrics"
        logger.info("metrics endpoint listening", extra={"metrics_url": endpoint, "metrics_service": service_name})
    if not readers:
        _current = ProcessMetrics(settings=settings)
        return _current
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = MeterProvider(metric_readers=readers, resource=resource)
    metrics.set_meter_provider(provider)
    _current = ProcessMetrics(provider=provider, endpoint=endpoint, settings=settings, _http_server=http_server)
    return _current


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


ObservationsFn = Callable[[], Awaitable[Mapping[tuple[tuple[str, str], ...], float]]]


class Sampler:
    """The last result of an async query, refreshed in the background, for observable gauges.

    `fetch` returns {attributes as sorted (key, value) pairs: value}. A failed sample keeps the
    previous values (and logs once per failure streak), so a database hiccup does not turn a
    backlog gauge into a misleading zero.
    """

    def __init__(self, name: str, fetch: ObservationsFn, interval_s: float) -> None:
        self.name = name
        self._fetch = fetch
        self._interval_s = interval_s
        self._values: Mapping[tuple[tuple[str, str], ...], float] = {}
        self._failing = False
        self._task: asyncio.Task[None] | None = None
        self.samples = 0

    def observe(self, _options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        """Observable-gauge callback: the last sample's values."""
        return [metrics.Observation(value, dict(attributes)) for attributes, value in self._values.items()]

    async def sample_once(self) -> None:
        """Run the query now and keep its values."""
        try:
            values = await self._fetch()
        except Exception as exc:
            if not self._failing:
                logger.warning("metrics sample %s failed: %s", self.name, exc)
            self._failing = True
            return
        self._failing = False
        self._values = dict(values)
        self.samples += 1

    def start(self) -> None:
        """Sample every interval in a background task until `stop()`."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"metrics-sampler-{self.name}")

    async def stop(self) -> None:
        """Cancel the background task and wait for it."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await self.sample_once()
            await asyncio.sleep(self._interval_s)


def attrs(**labels: str) -> tuple[tuple[str, str], ...]:
    """A hashable attribute set for `Sampler` results."""
    return tuple(sorted(labels.items()))
