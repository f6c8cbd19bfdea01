"""Helpers for read service tests: an event log that plays the relay, a publisher, projectors."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from read_service.generations import replica_generations
from read_service.keys import UserKeys
from read_service.projections.base import Projection
from read_service.projections.users import UsersProjection
from read_service.projector import Projector, ProjectorLinks, ProjectorOptions
from shared_kernel.contracts.event_log import NewEvent, append_events, events_channel, head_channel, read_positioned
from tessera.events.v1.envelope_pb2 import EventEnvelope, StreamHead
from tessera.users.v1.events_pb2 import UserDeactivated, UserProfileUpdated, UserRegistered

BASE_TIME = datetime(2024, 1, 1, tzinfo=UTC)


async def eventually(
    check: Callable[[], Any], timeout: float = 15.0, message: str = "condition not met in time"
) -> None:
    """Poll `check` (sync or async) until it is truthy; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(message)
        await asyncio.sleep(0.02)


class EventLog:
    """Writes events the way the write service and the relay together would: positioned and published."""

    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self.pool = pool

    async def append(self, *events: NewEvent) -> list[EventEnvelope]:
        """Append events with the next positions; return their envelopes in position order."""
        async with self.pool.acquire() as conn, conn.transaction():
            await append_events(conn, events, correlation_id="test", causation_id=str(uuid.uuid4()))
            last = await conn.fetchval("SELECT last_position FROM relay_state WHERE singleton FOR UPDATE")
            for offset, event in enumerate(events, start=1):
                await conn.execute(
                    "UPDATE outbox SET position = $1 WHERE event_id = $2",
                    last + offset,
                    event.event_id,
                )
            await conn.execute("UPDATE relay_state SET last_position = $1, published_position = $1", last + len(events))
        return await read_positioned(self.pool, last, len(events))

    async def head(self) -> int:
        """The last position assigned."""
        return int(await self.pool.fetchval("SELECT last_position FROM relay_state"))


class Publisher:
    """Publishes on a prefix's channels, as the relay does."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    async def event(self, envelope: EventEnvelope) -> None:
        """Publish one envelope."""
        await self.client.publish(events_channel(self.prefix), envelope.SerializeToString())

    async def head(self, position: int) -> None:
        """Publish a StreamHead heartbeat."""
        head = StreamHead(position=position)
        head.sent_at.GetCurrentTime()
        await self.client.publish(head_channel(self.prefix), head.SerializeToString())


@dataclass
class UserFactory:
    """Builds user events with consistent aggregate versions."""

    versions: dict[str, int] = field(default_factory=dict)
    clock: int = 0

    def _next(self, user_id: str) -> int:
        self.versions[user_id] = self.versions.get(user_id, 0) + 1
        return self.versions[user_id]

    def _tick(self) -> datetime:
        self.clock += 1
        return BASE_TIME + timedelta(minutes=self.clock)

    def register(
        self,
        email: str,
        username: str,
        full_name: str = "Some One",
        at: datetime | None = None,
        user_id: str | None = None,
    ) -> tuple[str, NewEvent]:
        """A UserRegistered event for a new user id (returned too)."""
        user_id = user_id or str(uuid.uuid4())
        when = at or self._tick()
        payload = UserRegistered(user_id=user_id, email=email, username=username, full_name=full_name)
        payload.registered_at.FromDatetime(when)
        return user_id, NewEvent(payload, "user", user_id, self._next(user_id), when)

    def update(self, user_id: str, full_name: str, bio: str = "", avatar_url: str = "") -> NewEvent:
        """A UserProfileUpdated event."""
        when = self._tick()
        payload = UserProfileUpdated(user_id=user_id, full_name=full_name, bio=bio, avatar_url=avatar_url)
        payload.updated_at.FromDatetime(when)
        return NewEvent(payload, "user", user_id, self._next(user_id), when)

    def deactivate(self, user_id: str, reason: str = "left") -> NewEvent:
        """A UserDeactivated event."""
        when = self._tick()
        payload = UserDeactivated(user_id=user_id, reason=reason)
        payload.deactivated_at.FromDatetime(when)
        return NewEvent(payload, "user", user_id, self._next(user_id), when)


@contextlib.asynccontextmanager
async def script_calls(redis_url: str, checkpoint_key: str) -> AsyncIterator[list[str]]:
    """Every EVALSHA naming `checkpoint_key` (the apply script's KEYS[1]) while the block runs, seen by MONITOR."""
    calls: list[str] = []
    client = aioredis.Redis.from_url(redis_url, socket_timeout=5)

    async def record() -> None:
        async with client.monitor() as monitor:
            async for command in monitor.listen():
                text = str(command.get("command", ""))
                if text.upper().startswith("EVALSHA") and checkpoint_key in text:
                    calls.append(text)

    watcher = asyncio.create_task(record())
    try:
        # Let the watcher send MONITOR before the block's first command.
        await asyncio.sleep(0)
        yield calls
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await client.aclose()


async def dump_keyspace(client: aioredis.Redis, prefix: str) -> dict[str, Any]:
    """Every key under `prefix` (prefix stripped) with its content, for comparing two key spaces."""
    result: dict[str, Any] = {}
    async for key in client.scan_iter(match=f"{prefix}*", count=1000):
        name = key.decode()[len(prefix) :]
        kind_reply = await client.type(key)
        kind = kind_reply.decode() if isinstance(kind_reply, bytes) else kind_reply
        if kind == "string":
            result[name] = await client.get(key)
        elif kind == "hash":
            result[name] = await client.hgetall(key)
        elif kind == "zset":
            result[name] = await client.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            result[name] = sorted(await client.smembers(key))
        elif kind == "list":
            result[name] = await client.lrange(key, 0, -1)
        else:
            raise AssertionError(f"unexpected {kind} at {name}")
    return result


StartProjector = Callable[..., Awaitable[Projector]]


@pytest.fixture
def event_log(db_pool: asyncpg.Pool[Any]) -> EventLog:
    return EventLog(db_pool)


@pytest.fixture
def publisher(redis_client: aioredis.Redis, redis_prefix: str) -> Publisher:
    return Publisher(redis_client, redis_prefix)


@pytest.fixture
def users() -> UserFactory:
    return UserFactory()


def make_projector(
    client: aioredis.Redis, pool: Any, projection: Projection, channel_prefix: str, **settings: Any
) -> Projector:
    """A Projector from keyword settings, each sorted into ProjectorOptions or ProjectorLinks by name."""
    links = {f.name for f in fields(ProjectorLinks)}
    return Projector(
        client,
        pool,
        projection,
        ProjectorOptions(channel_prefix, **{k: v for k, v in settings.items() if k not in links}),
        ProjectorLinks(**{k: v for k, v in settings.items() if k in links}),
    )


@pytest.fixture
async def start_projector(
    redis_server_url: str, db_pool: asyncpg.Pool[Any], redis_prefix: str, redis_client: aioredis.Redis
) -> AsyncIterator[StartProjector]:
    """Start projectors (each with its own Redis client) and stop them after the test.

    Depending on `redis_client` makes its teardown, which deletes the test's keys, run after
    the projectors have stopped writing them.
    """
    started: list[tuple[Projector, aioredis.Redis]] = []

    async def start(prefix: str | None = None, client_name: str | None = None, **options: Any) -> Projector:
        prefix = prefix or redis_prefix
        client = aioredis.Redis.from_url(redis_server_url, client_name=client_name, socket_timeout=5)
        options.setdefault("backoff_initial_s", 0.05)
        options.setdefault("backoff_max_s", 0.5)
        projector = make_projector(client, db_pool, UsersProjection(UserKeys(prefix)), prefix, **options)
        started.append((projector, client))
        projector.start()
        return projector

    yield start
    for projector, client in reversed(started):
        await projector.stop()
        await client.aclose()


Replica = Callable[..., Awaitable[tuple[Projector, UserKeys, list[bool]]]]


@pytest.fixture
async def start_replica(
    redis_server_url: str, db_pool, redis_prefix: str, redis_client: aioredis.Redis
) -> AsyncIterator[Replica]:
    """Start a projector with generations, as a replica runs it; return it, its query keys and readiness log."""
    started: list[tuple[Projector, aioredis.Redis]] = []

    async def start(
        cls: type[UsersProjection] = UsersProjection, **options: Any
    ) -> tuple[Projector, UserKeys, list[bool]]:
        client = aioredis.Redis.from_url(redis_server_url, socket_timeout=5)
        query_keys = UserKeys(redis_prefix)
        projection = cls(UserKeys(redis_prefix))
        readiness: list[bool] = []

        async def record(ready: bool) -> None:
            readiness.append(ready)

        options.setdefault("backoff_initial_s", 0.05)
        options.setdefault("backoff_max_s", 0.5)
        options.setdefault("probe_interval_s", 0.2)
        projector = make_projector(
            client,
            db_pool,
            projection,
            redis_prefix,
            on_readiness_change=record,
            generations=replica_generations(client, redis_prefix, projection, lambda p: cls(UserKeys(p)), query_keys),
            **options,
        )
        started.append((projector, client))
        projector.start()
        return projector, query_keys, readiness

    yield start
    for projector, client in reversed(started):
        await projector.stop()
        await client.aclose()
