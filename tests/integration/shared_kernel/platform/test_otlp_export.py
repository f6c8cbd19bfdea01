"""OTEL_*_EXPORTER=otlp really exports: metrics and spans reach an OTLP/gRPC receiver on a free port.

The receiver is a minimal in-test implementation of the collector's MetricsService and
TraceService; the exporters are the ones the processes build from the environment.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from shared_kernel.platform import metrics as process_metrics
from shared_kernel.platform import telemetry
from shared_kernel.platform.rpc_metrics import RpcRecorder

pytestmark = pytest.mark.integration

WAIT_S = 20.0


class Receiver(metrics_service_pb2_grpc.MetricsServiceServicer, trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every export request it gets."""

    def __init__(self) -> None:
        self.metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self.traces: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.received = threading.Condition()

    def Export(self, request: Any, context: Any) -> Any:
        """Both services' Export: store the request, answer success."""
        with self.received:
            if isinstance(request, metrics_service_pb2.ExportMetricsServiceRequest):
                self.metrics.append(request)
                reply: object = metrics_service_pb2.ExportMetricsServiceResponse()
            else:
                self.traces.append(request)
                reply = trace_service_pb2.ExportTraceServiceResponse()
            self.received.notify_all()
        return reply


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    """A receiver on a free port, named by OTEL_EXPORTER_OTLP_ENDPOINT."""
    servicer = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    try:
        yield servicer
    finally:
        server.stop(grace=None)


def test_metrics_reach_the_otlp_endpoint(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    provider = MeterProvider(
        metric_readers=process_metrics._otlp_readers(), resource=Resource.create({"service.name": "otlp-test"})
    )
    try:
        RpcRecorder(provider).record("/tessera.users.v1.UserQueryService/GetUser", grpc.StatusCode.NOT_FOUND, 0.01)
        assert provider.force_flush(timeout_millis=int(WAIT_S * 1000))
        with receiver.received:
            assert receiver.received.wait_for(lambda: receiver.metrics, timeout=WAIT_S)
    finally:
        provider.shutdown()

    # The first export (the flush); shutdown may send the same cumulative figures again.
    [resource_metrics] = receiver.metrics[0].resource_metrics
    service = {a.key: a.value.string_value for a in resource_metrics.resource.attributes}["service.name"]
    assert service == "otlp-test"
    [metric] = [m for sm in resource_metrics.scope_metrics for m in sm.metrics if m.name == "rpc.server.duration"]
    [point] = metric.histogram.data_points
    assert point.count == 1
    attributes = {a.key: a.value.string_value for a in point.attributes}
    assert attributes == {
        "rpc.service": "tessera.users.v1.UserQueryService",
        "rpc.method": "GetUser",
        "rpc.grpc.status_code": "NOT_FOUND",
    }


def test_spans_reach_the_otlp_endpoint(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    [exporter] = telemetry._exporters()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        with provider.get_tracer("test").start_as_current_span("exported") as span:
            trace_id = span.get_span_context().trace_id
        with receiver.received:
            assert receiver.received.wait_for(lambda: receiver.traces, timeout=WAIT_S)
    finally:
        provider.shutdown()

    spans = [
        s for request in receiver.traces for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans
    ]
    assert [(s.name, int.from_bytes(s.trace_id, "big")) for s in spans] == [("exported", trace_id)]
