"""One trace from the client's call to every replica's projection, through Postgres and Redis.

In this one process, with one TracerProvider and an in-memory exporter: the real write gRPC
server on a free port over a fresh database, a real relay publishing to Redis, and two
projectors (two replicas' worth of views) applying from Redis. The spans must form the tree
docs/decisions/0020-observability.md describes:

    client call (CLIENT, the test)
      └─ /tessera.users.v1.UserCommandService/RegisterUser (SERVER)
           └─ transaction RegisterUser (INTERNAL; its context goes into the outbox row)
                ├─ publish <prefix>events (PRODUCER, the relay)
                └─ users project (CONSUMER, once per replica)
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import PostgresDsn, RedisDsn

from read_service.keys import UserKeys
from read_service.projections.users import UsersProjection
from read_service.projector import Projector, ProjectorOptions
from relay.runner import Relay
from relay.settings import RelaySettings
from shared_kernel.platform.logs import JsonFormatter
from tessera.users.v1 import user_command_service_pb2 as pb
from tessera.users.v1 import user_command_service_pb2_grpc as pb_grpc
from tests.integration.write_service.support import in_process_write_server

pytestmark = pytest.mark.integration

REPLICAS = 2
WAIT_S = 20.0


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The process's TracerProvider (installed here unless a test before did) exporting to memory."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
        # Another test may have raced us to it; use whichever the API kept.
        provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    # A provider's processors cannot be removed: make this one inert for later tests.
    exporter.shutdown()


@pytest.fixture
async def write_channel(db_pool: asyncpg.Pool[Any]) -> AsyncIterator[grpc.aio.Channel]:
    """The write service's command API in this process, on a free port."""
    async with in_process_write_server(db_pool) as channel:
        yield channel


@pytest.fixture
async def relay(
    database_url: str, redis_server_url: str, redis_prefix: str, db_pool: asyncpg.Pool[Any]
) -> AsyncIterator[Relay]:
    """A running relay on the test's database, publishing on the test's Redis prefix."""
    settings = RelaySettings(
        database_url=PostgresDsn(database_url),
        redis_url=RedisDsn(redis_server_url),
        redis_key_prefix=redis_prefix,
        relay_poll_interval_s=0.2,
        relay_heartbeat_interval_s=0.2,
        relay_standby_retry_s=0.1,
        relay_shutdown_grace_s=5.0,
    )
    client = aioredis.Redis.from_url(redis_server_url, socket_timeout=5)
    running = Relay(settings, db_pool, client)
    task = asyncio.create_task(running.run())
    try:
        yield running
    finally:
        await asyncio.wait_for(running.shutdown(), WAIT_S)
        await asyncio.wait_for(task, WAIT_S)
        await client.aclose()


@pytest.fixture
async def projectors(
    redis_server_url: str, redis_prefix: str, db_pool: asyncpg.Pool[Any], redis_client: aioredis.Redis
) -> AsyncIterator[list[Projector]]:
    """Two replicas' users projectors: one event stream, views under separate key prefixes."""
    started: list[tuple[Projector, aioredis.Redis]] = []
    for replica in range(REPLICAS):
        client = aioredis.Redis.from_url(redis_server_url, socket_timeout=5)
        keys = UserKeys(f"{redis_prefix}replica{replica}:")
        projector = Projector(
            client, db_pool, UsersProjection(keys), ProjectorOptions(redis_prefix, backoff_initial_s=0.05)
        )
        projector.start()
        started.append((projector, client))
    try:
        yield [projector for projector, _ in started]
    finally:
        for projector, client in reversed(started):
            await projector.stop()
            await client.aclose()


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The command bus's DEBUG records as the services write them (JSON lines with trace ids)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("write_service.service_layer.messagebus")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def _one(spans: list[ReadableSpan], kind: trace.SpanKind, name_start: str) -> ReadableSpan:
    found = [s for s in spans if s.kind is kind and s.name.startswith(name_start)]
    assert len(found) == 1, [(s.name, s.kind) for s in spans]
    return found[0]


def _is_child(child: ReadableSpan, parent: ReadableSpan) -> bool:
    assert child.parent is not None, f"{child.name} has no parent"
    assert parent.context is not None
    linked: bool = child.parent.span_id == parent.context.span_id and child.parent.trace_id == parent.context.trace_id
    return linked


async def test_one_trace_links_the_call_the_commit_the_publish_and_every_replicas_apply(
    spans: InMemorySpanExporter,
    write_channel: grpc.aio.Channel,
    relay: Relay,
    projectors: list[Projector],
    json_log: io.StringIO,
) -> None:
    tracer = trace.get_tracer("test")
    stub = pb_grpc.UserCommandServiceStub(write_channel)
    with tracer.start_as_current_span("client RegisterUser", kind=trace.SpanKind.CLIENT):
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
        reply = await stub.RegisterUser(
            pb.RegisterUserRequest(
                email="ada@example.com",
                username="ada_lovelace",
                password="Zebra-Quokka-73!unique",
                full_name="Ada Lovelace",
            ),
            metadata=tuple(carrier.items()),
            timeout=WAIT_S,
        )
    assert reply.user_id
    for projector in projectors:
        assert await projector.wait_for_checkpoint(1, WAIT_S), f"projector stuck at {projector.checkpoint}"

    finished = list(spans.get_finished_spans())
    client = _one(finished, trace.SpanKind.CLIENT, "client RegisterUser")
    server = _one(finished, trace.SpanKind.SERVER, "/tessera.users.v1.UserCommandService/RegisterUser")
    transaction = _one(finished, trace.SpanKind.INTERNAL, "transaction RegisterUser")
    publish = _one(finished, trace.SpanKind.PRODUCER, "publish ")
    applies = [s for s in finished if s.kind is trace.SpanKind.CONSUMER and s.name == "users project"]

    assert client.context is not None
    trace_id = client.context.trace_id
    assert len(applies) == REPLICAS
    for span in [server, transaction, publish, *applies]:
        assert span.context is not None
        assert span.context.trace_id == trace_id, span.name
    assert _is_child(server, client)
    assert _is_child(transaction, server)
    assert _is_child(publish, transaction)
    for apply in applies:
        assert _is_child(apply, transaction)
        assert apply.attributes is not None
        assert apply.attributes["tessera.projection.outcome"] == "applied"
        assert apply.attributes["tessera.event.position"] == 1

    assert publish.attributes is not None
    assert publish.attributes["tessera.event.position"] == 1
    event_id = publish.attributes["messaging.message.id"]
    assert transaction.attributes is not None
    assert transaction.attributes["tessera.outbox.event_ids"] == (event_id,)
    assert transaction.status.is_ok

    # The service's JSON log lines carry the ids of the span they were written in.
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    succeeded = [line for line in lines if line["message"] == "command succeeded"]
    assert len(succeeded) == 1
    assert server.context is not None
    assert succeeded[0]["trace_id"] == format(trace_id, "032x")
    assert succeeded[0]["span_id"] == format(server.context.span_id, "016x")
