"""Publishing envelopes and heartbeats to Redis pub/sub, with a producer span per event."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import redis.asyncio as aioredis
from opentelemetry import trace

from shared_kernel.event_log import events_channel, head_channel
from shared_kernel.telemetry import context_from_envelope
from tessera.events.v1.envelope_pb2 import EventEnvelope, StreamHead


class Publisher(Protocol):
    """Where the relay sends events; tests substitute failing or blocking ones."""

    async def publish_events(self, envelopes: Sequence[EventEnvelope]) -> None:
        """Send `envelopes` in the given order; raise if any may not have been sent."""

    async def publish_head(self, head: StreamHead) -> None:
        """Send a heartbeat naming the highest published position."""


class RedisPublisher:
    """Publishes each batch as one pipelined round trip to the events channel.

    Nothing is also written to a Redis stream: the outbox table is the durable log that
    replicas catch up from (by position, through its unique index), so a second copy in
    Redis would only add memory, trimming policy and a second source of truth.
    """

    def __init__(self, redis: aioredis.Redis, key_prefix: str, tracer: trace.Tracer | None = None) -> None:
        self._redis = redis
        self._events_channel = events_channel(key_prefix)
        self._head_channel = head_channel(key_prefix)
        self._tracer = tracer or trace.get_tracer("tessera.relay")

    async def publish_events(self, envelopes: Sequence[EventEnvelope]) -> None:
        """PUBLISH every envelope, serialized once, in one pipeline without MULTI."""
        if not envelopes:
            return
        spans = [self._start_span(e) for e in envelopes if e.traceparent]
        failure: BaseException | None = None
        try:
            pipe = self._redis.pipeline(transaction=False)
            for envelope in envelopes:
                pipe.publish(self._events_channel, envelope.SerializeToString())
            await pipe.execute()
        except Exception as exc:
            failure = exc
            raise
        finally:
            for span in spans:
                if failure is not None:
                    span.record_exception(failure)
                    span.set_status(trace.StatusCode.ERROR, type(failure).__name__)
                span.end()

    async def publish_head(self, head: StreamHead) -> None:
        """PUBLISH a StreamHead on the head channel."""
        await self._redis.publish(self._head_channel, head.SerializeToString())

    def _start_span(self, envelope: EventEnvelope) -> trace.Span:
        # Events without a trace context get no span: a root span per event would be noise.
        return self._tracer.start_span(
            f"publish {self._events_channel}",
            context=context_from_envelope(envelope.traceparent, envelope.tracestate),
            kind=trace.SpanKind.PRODUCER,
            attributes={
                "messaging.system": "redis",
                "messaging.operation.type": "send",
                "messaging.destination.name": self._events_channel,
                "messaging.message.id": envelope.event_id,
                "tessera.event.type": envelope.event_type,
                "tessera.event.position": envelope.position,
            },
        )
