"""Helpers for the relay tests: writing outbox rows like the write side, recording a channel, fakes."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import asyncpg
import redis.asyncio as aioredis

from relay.publisher import Publisher
from shared_kernel.contracts.event_log import NewEvent, append_events
from tessera.events.v1.envelope_pb2 import EventEnvelope, StreamHead

T = TypeVar("T")
AGGREGATE_TYPE = "thing"
# Two-int advisory keys live apart from the relay's one-bigint lock key.
_AGGREGATE_LOCK_CLASS = 4242


async def write_event(conn: Any, aggregate_id: str) -> NewEvent:
    """Append the aggregate's next event inside the caller's transaction, as the write side would.

    The advisory lock stands in for the write side's lock on the aggregate's row: it is
    what makes version v+1's outbox row get a higher id than version v's.
    """
    await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _AGGREGATE_LOCK_CLASS, aggregate_id)
    version = await conn.fetchval(
        "SELECT coalesce(max(aggregate_version), 0) + 1 FROM outbox WHERE aggregate_type = $1 AND aggregate_id = $2",
        AGGREGATE_TYPE,
        aggregate_id,
    )
    event = NewEvent(
        payload=StreamHead(position=version),
        aggregate_type=AGGREGATE_TYPE,
        aggregate_id=aggregate_id,
        aggregate_version=version,
        occurred_at=datetime.now(UTC),
    )
    await append_events(conn, [event], correlation_id="test", causation_id=str(uuid.uuid4()))
    return event


async def insert_events(pool: asyncpg.Pool[Any], aggregate_id: str, count: int) -> list[NewEvent]:
    """Commit `count` events for one aggregate, one transaction each."""
    written = []
    for _ in range(count):
        async with pool.acquire() as conn, conn.transaction():
            written.append(await write_event(conn, aggregate_id))
    return written


async def lock_holder_pid(db: asyncpg.Pool[Any] | asyncpg.Connection[Any], key: int) -> int | None:
    """Backend pid holding one-bigint advisory lock `key` in this database (advisory locks are per database)."""
    pid: int | None = await db.fetchval(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND classid = $1::bigint::oid AND objid = $2::bigint::oid",
        key >> 32,
        key & 0xFFFFFFFF,
    )
    return pid


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll `predicate` until it holds or `timeout` passes (then fail naming `what`)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


class ChannelRecorder(Generic[T]):
    """Collects every message published on one Redis channel through a real subscription."""

    def __init__(self, client: aioredis.Redis, channel: str, parse: Callable[[bytes], T]) -> None:
        self._client = client
        self._channel = channel
        self._parse = parse
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pubsub: Any = None
        self.messages: list[T] = []

    async def start(self) -> None:
        """Subscribe and return once Redis confirmed the subscription."""
        self._pubsub = self._client.pubsub()
        await self._pubsub.subscribe(self._channel)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while loop.time() < deadline:
            message = await self._pubsub.get_message(timeout=1.0)
            if message is not None and message["type"] == "subscribe":
                break
        else:
            raise AssertionError("subscription was not confirmed")
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            message = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None and message["type"] == "message":
                self.messages.append(self._parse(message["data"]))
                self._changed.set()

    async def wait_for(self, predicate: Callable[[list[T]], bool], timeout: float = 20.0, what: str = "") -> None:
        """Wait until `predicate(messages)` holds, failing after `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self._changed.clear()
            if predicate(self.messages):
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what or 'messages'}; got {len(self.messages)}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def close(self) -> None:
        """Stop reading and unsubscribe."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})
        if self._pubsub is not None:
            await self._pubsub.aclose()


def event_ids(envelopes: Sequence[EventEnvelope]) -> set[str]:
    """The distinct event ids among `envelopes`."""
    return {e.event_id for e in envelopes}


def ids_of(events: Sequence[NewEvent]) -> set[str]:
    """The event ids of events as written."""
    return {str(e.event_id) for e in events}


def assert_gap_free(envelopes: Sequence[EventEnvelope], expected: set[str]) -> dict[int, str]:
    """Every expected event arrived, positions are exactly 1..N, and a re-published position kept its event."""
    by_position: dict[int, str] = {}
    for envelope in envelopes:
        assert by_position.setdefault(envelope.position, envelope.event_id) == envelope.event_id, (
            f"position {envelope.position} was published for two different events"
        )
    assert sorted(by_position) == list(range(1, len(expected) + 1))
    assert set(by_position.values()) == expected
    return by_position


class FailingPublisher:
    """Fails the first `failures` batches (as if Redis were down), then delegates."""

    def __init__(self, inner: Publisher, failures: int, error: BaseException) -> None:
        self._inner = inner
        self._error = error
        self.failures_left = failures
        self.calls = 0

    async def publish_events(self, envelopes: Sequence[EventEnvelope]) -> None:
        """Raise while failures are left, else publish."""
        self.calls += 1
        if self.failures_left > 0:
            self.failures_left -= 1
            raise self._error
        await self._inner.publish_events(envelopes)

    async def publish_head(self, head: StreamHead) -> None:
        """Delegate."""
        await self._inner.publish_head(head)


class PublishThenCrash:
    """Publishes the first batch and then raises, as if the process died before marking it published."""

    def __init__(self, inner: Publisher) -> None:
        self._inner = inner
        self.crashed = False

    async def publish_events(self, envelopes: Sequence[EventEnvelope]) -> None:
        """Publish, then raise once."""
        await self._inner.publish_events(envelopes)
        if not self.crashed:
            self.crashed = True
            raise RuntimeError("simulated crash after publishing")

    async def publish_head(self, head: StreamHead) -> None:
        """Delegate."""
        await self._inner.publish_head(head)


class HangingPublisher:
    """The first batch hangs until cancelled (recording that it was); later ones are delegated."""

    def __init__(self, inner: Publisher) -> None:
        self._inner = inner
        self.entered = asyncio.Event()
        self.cancelled = asyncio.Event()
        self._hung = False

    async def publish_events(self, envelopes: Sequence[EventEnvelope]) -> None:
        """Hang the first time, publish afterwards."""
        if not self._hung:
            self._hung = True
            self.entered.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        await self._inner.publish_events(envelopes)

    async def publish_head(self, head: StreamHead) -> None:
        """Delegate."""
        await self._inner.publish_head(head)


class Gate:
    """A connection factory that can be cut off, as if the network to Postgres were down."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self.open = True

    async def connect(self) -> asyncpg.Connection[Any]:
        """Connect, or fail like an unreachable server."""
        if not self.open:
            raise ConnectionRefusedError("gate closed")
        conn: asyncpg.Connection[Any] = await asyncpg.connect(self._dsn)
        return conn
