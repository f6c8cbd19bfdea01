"""Which spans a service records, from the OTEL_* variables: none when nothing would export them."""

from __future__ import annotations

import pytest
from opentelemetry import trace

from shared_kernel.contracts.trace_context import context_from_envelope, current_trace_context
from shared_kernel.platform.telemetry import tracer_provider

CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture(autouse=True)
def _no_otel_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"):
        monkeypatch.delenv(name, raising=False)


def test_without_an_exporter_spans_are_not_recorded_but_keep_their_ids_and_the_callers_trace() -> None:
    provider = tracer_provider("test")
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("call", context=context_from_envelope(CALLER, "")) as span:
        assert not span.is_recording()
        context = span.get_span_context()
        assert context.is_valid
        assert format(context.trace_id, "032x") == CALLER.split("-")[1]
        assert format(context.span_id, "016x") != CALLER.split("-")[2]  # a span of its own
        traceparent, _ = current_trace_context()
    # What goes into the outbox: this span's ids, marked not sampled.
    assert traceparent == f"00-{CALLER.split('-')[1]}-{context.span_id:016x}-00"
    with tracer.start_as_current_span("root") as root:
        assert not root.is_recording()
        assert root.get_span_context().is_valid


@pytest.mark.parametrize(
    ("variable", "value"), [("OTEL_TRACES_EXPORTER", "console"), ("OTEL_TRACES_SAMPLER", "always_on")]
)
def test_an_exporter_or_an_explicit_sampler_records_spans(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    provider = tracer_provider("test")
    try:
        with provider.get_tracer("test").start_as_current_span("call") as span:
            assert span.is_recording()
            assert span.get_span_context().trace_flags.sampled
    finally:
        provider.shutdown()


def test_the_process_wide_provider_is_left_alone() -> None:
    before = trace.get_tracer_provider()
    tracer_provider("test")
    assert trace.get_tracer_provider() is before
