"""RedisPublisher: one script call per chunk, envelopes in order, a producer span per traced event."""

from __future__ import annotations

from typing import Any, cast

import pytest
import redis.asyncio as aioredis
import redis.exceptions
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from relay.outbox import Fence
from relay.publisher import PUBLISH_CHUNK, RedisPublisher
from tessera.events.v1.envelope_pb2 import EventEnvelope, StreamHead

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"


class FakeScript:
    def __init__(self, owner: FakeRedis, source: str) -> None:
        self.owner = owner
        self.source = source

    async def __call__(self, keys: list[str] | None = None, args: list[str | bytes] | None = None) -> int:
        if self.owner.fail:
            raise redis.exceptions.ConnectionError("redis is down")
        assert not keys, "a channel is not a key"
        channel, *messages = args or []
        assert isinstance(channel, str)
        self.owner.calls.append([(channel, cast(bytes, m)) for m in messages])
        return len(messages)


class FakeRedis:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[list[tuple[str, bytes]]] = []
        self.published: list[tuple[str, bytes]] = []

    def register_script(self, source: str) -> FakeScript:
        assert "PUBLISH" in source
        return FakeScript(self, source)

    async def publish(self, channel: str, data: bytes) -> int:
        self.published.append((channel, data))
        return 1


def _envelope(position: int, traced: bool) -> EventEnvelope:
    return EventEnvelope(
        event_id=f"event-{position}",
        event_type="tessera.events.v1.StreamHead",
        position=position,
        traceparent=f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01" if traced else "",
    )


@pytest.fixture
def spans() -> tuple[InMemorySpanExporter, trace.Tracer]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter, provider.get_tracer("test")


async def test_a_batch_is_one_script_call_in_order(spans: tuple[InMemorySpanExporter, trace.Tracer]) -> None:
    fake = FakeRedis()
    publisher = RedisPublisher(cast(aioredis.Redis, fake), "p:", spans[1])
    envelopes = [_envelope(p, traced=False) for p in (1, 2, 3)]

    await publisher.publish_events(envelopes)

    assert fake.calls == [[("p:events", e.SerializeToString()) for e in envelopes]]


async def test_a_large_batch_is_split_into_chunks_in_order(spans: tuple[InMemorySpanExporter, trace.Tracer]) -> None:
    fake = FakeRedis()
    publisher = RedisPublisher(cast(aioredis.Redis, fake), "p:", spans[1])
    envelopes = [_envelope(p, traced=False) for p in range(1, PUBLISH_CHUNK + 3)]

    await publisher.publish_events(envelopes)

    assert [len(call) for call in fake.calls] == [PUBLISH_CHUNK, 2]
    assert [m for call in fake.calls for _, m in call] == [e.SerializeToString() for e in envelopes]


async def test_each_traced_event_gets_a_producer_span_under_its_command(
    spans: tuple[InMemorySpanExporter, trace.Tracer],
) -> None:
    exporter, tracer = spans
    publisher = RedisPublisher(cast(aioredis.Redis, FakeRedis()), "p:", tracer)

    await publisher.publish_events([_envelope(1, traced=True), _envelope(2, traced=False), _envelope(3, traced=True)])

    finished = exporter.get_finished_spans()
    assert len(finished) == 2, "untraced events get no span"
    for span, position in zip(finished, (1, 3), strict=True):
        assert span.kind is trace.SpanKind.PRODUCER
        assert span.parent is not None
        assert format(span.parent.span_id, "016x") == PARENT_SPAN_ID
        assert format(span.context.trace_id, "032x") == TRACE_ID
        attributes: dict[str, Any] = dict(span.attributes or {})
        assert attributes["tessera.event.position"] == position
        assert attributes["messaging.destination.name"] == "p:events"


async def test_a_failed_batch_raises_and_marks_its_spans(spans: tuple[InMemorySpanExporter, trace.Tracer]) -> None:
    exporter, tracer = spans
    publisher = RedisPublisher(cast(aioredis.Redis, FakeRedis(fail=True)), "p:", tracer)

    with pytest.raises(redis.exceptions.ConnectionError):
        await publisher.publish_events([_envelope(1, traced=True)])

    (span,) = exporter.get_finished_spans()
    assert span.status.status_code is trace.StatusCode.ERROR


async def test_heads_go_to_the_head_channel() -> None:
    fake = FakeRedis()
    publisher = RedisPublisher(cast(aioredis.Redis, fake), "p:")
    head = StreamHead(position=9)

    await publisher.publish_head(head)

    assert fake.published == [("p:events:head", head.SerializeToString())]


def test_fence_splits_the_key_like_pg_locks() -> None:
    fence = Fence(pid=1, key=0x1234_5678_9ABC_DEF0)
    assert (fence.classid, fence.objid) == (0x1234_5678, 0x9ABC_DEF0)
