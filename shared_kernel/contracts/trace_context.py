"""W3C trace context as the processes pass it on: in gRPC metadata and in each event envelope.

An event carries the `traceparent`/`tracestate` of the command that produced it, so the relay,
the replicas and the saga worker continue that trace. The format is the contract; which spans
are recorded and where they are exported is the platform's business (`shared_kernel.platform.telemetry`).
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_propagator = TraceContextTextMapPropagator()


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
