"""Metrics wiring without a network: exporters chosen from OTEL_METRICS_EXPORTER, the RPC recorder,
the projection lag figure and the sampler behind database-backed gauges."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader, PeriodicExportingMetricReader

from read_service.projector import ProjectorState, ProjectorStatus
from read_service.projector_metrics import lag_seconds
from shared_kernel.platform import metrics as process_metrics
from shared_kernel.platform.metrics import Sampler, attrs
from shared_kernel.platform.rpc_metrics import RpcRecorder
from shared_kernel.platform.settings import MetricsSettings


def points(reader: InMemoryMetricReader, name: str) -> list[Any]:
    data = reader.get_metrics_data()
    assert data is not None
    return [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
        for point in metric.data.data_points
    ]


def test_otlp_in_otel_metrics_exporter_adds_a_periodic_otlp_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    readers = process_metrics._otlp_readers()
    assert len(readers) == 1
    (reader,) = readers
    assert isinstance(reader, PeriodicExportingMetricReader)
    assert isinstance(reader._exporter, OTLPMetricExporter)
    reader.shutdown(timeout_millis=1000)


@pytest.mark.parametrize("value", ["", "none", "prometheus"])
def test_no_otlp_reader_unless_asked_for(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", value)
    assert process_metrics._otlp_readers() == []


def test_without_port_or_exporter_nothing_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_METRICS_EXPORTER", raising=False)
    configured = process_metrics.configure_metrics("test", MetricsSettings(metrics_port=None))
    assert not configured.enabled
    assert configured.endpoint is None
    configured.shutdown()


def test_metrics_port_must_be_a_port() -> None:
    with pytest.raises(ValueError, match="metrics_port"):
        MetricsSettings(metrics_port=70000)


def test_rpc_recorder_counts_calls_by_method_and_status() -> None:
    reader = InMemoryMetricReader()
    recorder = RpcRecorder(MeterProvider(metric_readers=[reader]))
    method = "/tessera.users.v1.UserQueryService/GetUser"
    recorder.record(method, grpc.StatusCode.OK, 0.002)
    recorder.record(method, grpc.StatusCode.OK, 0.004)
    recorder.record(method, grpc.StatusCode.INVALID_ARGUMENT, 0.001)

    found = {
        (p.attributes["rpc.method"], p.attributes["rpc.grpc.status_code"]): p
        for p in points(reader, "rpc.server.duration")
    }
    assert set(found) == {("GetUser", "OK"), ("GetUser", "INVALID_ARGUMENT")}
    ok = found["GetUser", "OK"]
    assert isinstance(ok, HistogramDataPoint)
    assert ok.count == 2
    assert ok.sum == pytest.approx(0.006)
    assert ok.attributes is not None
    assert ok.attributes["rpc.service"] == "tessera.users.v1.UserQueryService"
    assert found["GetUser", "INVALID_ARGUMENT"].count == 1


def status(checkpoint: int, head: int, occurred_at: datetime | None, seen: int = 0) -> ProjectorStatus:
    return ProjectorStatus(
        projection="users",
        state=ProjectorState.LIVE,
        ready=True,
        checkpoint=checkpoint,
        head=head,
        last_applied_at=None,
        applied=checkpoint,
        duplicates=0,
        catch_ups=0,
        reconnects=0,
        poison_events=0,
        last_applied_occurred_at=occurred_at,
        seen=seen,
    )


def test_lag_is_zero_when_caught_up_and_the_newest_applied_events_age_while_behind() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert lag_seconds(status(5, 5, now - timedelta(hours=1)), now) == 0.0
    assert lag_seconds(status(5, 9, now - timedelta(seconds=3)), now) == pytest.approx(3.0)
    assert lag_seconds(status(0, 9, None), now) is None


def test_events_a_projection_ignores_are_no_lag_while_their_marker_waits() -> None:
    # Users applied its last event an hour ago; the product events after it are done with,
    # their checkpoint marker just not written yet.
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert lag_seconds(status(5, 9, now - timedelta(hours=1), seen=9), now) == 0.0
    assert lag_seconds(status(5, 9, now - timedelta(seconds=3), seen=7), now) == pytest.approx(3.0)


async def test_sampler_keeps_the_last_good_values_when_a_sample_fails() -> None:
    results: list[dict[tuple[tuple[str, str], ...], float] | Exception] = [
        {attrs(stage="unpositioned"): 4.0},
        RuntimeError("database away"),
    ]

    async def fetch() -> dict[tuple[tuple[str, str], ...], float]:
        result = results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result

    sampler = Sampler("test", fetch, 60.0)
    await sampler.sample_once()
    await sampler.sample_once()
    observed = list(sampler.observe(None))  # type: ignore[arg-type]
    assert [(o.value, o.attributes) for o in observed] == [(4.0, {"stage": "unpositioned"})]
    assert sampler.samples == 1
