"""OpenTelemetry setup: which spans a process records and where it exports them.

How a trace context travels in metadata and envelopes is `shared_kernel.contracts.trace_context`.

Tracing is configured from the standard OTEL_* variables. With no exporter (and no
OTEL_TRACES_SAMPLER) set, spans are not recorded, since nothing would ever read them: each
still gets a trace id and a span id, so logs carry them and envelopes carry the trace context
on to the relay and the replicas, but none of a recorded span's work is done per call.
"""

from __future__ import annotations

import logging
import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Sampler

logger = logging.getLogger(__name__)


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


def tracer_provider(service_name: str) -> TracerProvider:
    """The TracerProvider the OTEL_* variables describe (OTEL_SERVICE_NAME overrides the name)."""
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    exporters = _exporters()
    sampler: Sampler | None = None  # None: the SDK reads OTEL_TRACES_SAMPLER (default: parent-based, on)
    if not exporters and not os.environ.get("OTEL_TRACES_SAMPLER", "").strip():
        # Nothing would see a recorded span: non-recording ones keep the ids (for logs and
        # envelopes) without the attributes, events and end-of-span processing per call.
        sampler = ALWAYS_OFF
    provider = TracerProvider(resource=resource, sampler=sampler)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def configure_tracing(service_name: str) -> TracerProvider:
    """Install the TracerProvider the OTEL_* variables describe for this process."""
    provider = tracer_provider(service_name)
    trace.set_tracer_provider(provider)
    return provider


def records_spans() -> bool:
    """Whether the installed tracer provider can record spans at all (False when it samples none)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        return False  # the API's default: no-op spans
    return provider.sampler is not ALWAYS_OFF
