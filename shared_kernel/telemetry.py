"""OpenTelemetry setup and W3C trace-context propagation through the event envelope.

Tracing is configured from the standard OTEL_* variables. With none set, spans are
created (so trace ids reach logs and envelopes) but exported nowhere.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

logger = logging.getLogger(__name__)
_propagator = TraceContextTextMapPropagator()


def _exporters() -> list[SpanExporter]:
    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    exporters: list[SpanExporter] = []
    for name in names:
        if name == "none":
            continue
        if name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                    OTLPSpanExporter,
                )
            except ImportError:
                logger.warning("OTEL_TRACES_EXPORTER=otlp but opentelemetry-exporter-otlp is not installed")
                continue
            exporters.append(OTLPSpanExporter())
        else:
            logger.warning("unknown OTEL_TRACES_EXPORTER %r ignored", name)
    return exporters


def configure_tracing(service_name: str) -> TracerProvider:
    """Install a TracerProvider for this process (OTEL_SERVICE_NAME overrides the name)."""
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    for exporter in _exporters():
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def current_trace_context() -> tuple[str, str]:
    """The (traceparent, tracestate) of the current span, empty strings when there is none."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent", ""), carrier.get("tracestate", "")


def context_from_headers(headers: Mapping[str, str]) -> otel_context.Context:
    """Extract a trace context from W3C headers (e.g. gRPC metadata or an envelope)."""
    return _propagator.extract(carrier=dict(headers))


def context_from_envelope(traceparent: str, tracestate: str) -> otel_context.Context:
    """Extract the producing command's trace context from an event envelope's fields."""
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    return _propagator.extract(carrier=carrier)
