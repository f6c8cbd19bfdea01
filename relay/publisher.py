"""Publishing envelopes and heartbeats to Redis pub/sub, with a producer span per event."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import redis.asyncio as aioredis
from opentelemetry import trace

from shared_kernel.contracts.event_log import events_channel, head_channel
from shared_kernel.contracts.trace_context import context_from_envelope
from tessera.events.v1.envelope_pb2 import EventEnvelope, StreamHead


class Publisher(Protocol):
    """Where the relay sends events; tests substitute failing or blocking ones."""

    async def publish_events(self, envelopes: Sequence[EventEnvelope]) -> None:
        """Send `envelopes` in the given order; raise if any may not have been sent."""

    async def publish_head(self, head: StreamHead) -> None:
        """Send a heartbeat naming the highest published position."""


# PUBLISH every argument after the first on the channel named by the first, in order.
# The channel is an argument, not a key: pub/sub channels are not part of the keyspace.
_PUBLISH_ALL = """
local channel = ARGV[1]
for i = 2, #ARGV do
    redis.call('PUBLISH', channel, ARGV[i])
end
return #ARGV - 1
"""

# Envelopes per script call: bounds how long one call keeps Redis busy (well under a
# millisecond) and the size of one request.
PUBLISH_CHUNK = 500


class RedisPublisher:
    """Publishes each batch to the events channel with one script call per chunk of envelopes.

    A script that PUBLISHes every envelope of the chunk answers once, where a pipeline of
    PUBLISH commands answers once per envelope: reading and parsing those replies was most
    of the relay's CPU time. Subscribers see the same messages, in the same order.

    Nothing is also written to a Redis stream: the outbox table is the durable log that
    replicas catch up from (by position, through its unique index), so a second copy in
    Redis would only add memory, trimming policy and a second source of truth.
    """

    def __init__(self, redis: aioredis.Redis, key_prefix: str, tracer: trace.Tracer | None = None) -> None:
        self._redis = redis
        self._events_channel = events_channel(key_prefix)
        self._head_channel = head_channel(key_prefix)
        self._tracer = tracer or trace.get_tracer("tessera.relay")
        # Sent by SHA; loaded again by itself after a Redis restart forgot it (NOSCRIPT).
        self._publish_all = redis.register_script(_PUBLISH_ALL)

    async def publish_events(self, envelopes: Sequence[EventEnvelope]) -> None:
        """PUBLISH every envelope, serialized once, in order, one script call per PUBLISH_CHUNK envelopes."""
        if not envelopes:
            return
        spans = [self._start_span(e) for e in envelopes if e.traceparent]
        failure: BaseException | None = None
        try:
            for start in range(0, len(envelopes), PUBLISH_CHUNK):
                chunk = envelopes[start : start + PUBLISH_CHUNK]
                await self._publish_all(args=[self._events_channel, *(e.SerializeToString() for e in chunk)])
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
