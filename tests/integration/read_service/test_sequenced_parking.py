"""Sequenced parking (decision 0029): a poison order event parks that order only, in real Postgres and Redis.

The other orders keep updating, the parked order's later events wait behind it, the checkpoint
moves by exactly one per position, and after an operator's retry or skip the views equal a
rebuild from the log.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2

from read_service.admin import request
from read_service.bootstrap import running_read_service
from read_service.consistency import PARKED_HEADER, STALE_HEADER
from read_service.generations import keyspace_prefix, skip_field, skips_key
from read_service.keys import OrderKeys, UserKeys
from read_service.projections.orders import OrdersProjection
from read_service.projections.users import UsersProjection
from read_service.projector import ParkingMode, Projector
from read_service.published import PublishedState
from read_service.rebuild import rebuild, registered_projections
from read_service.sequences import log_key, parked_aggregates, pending_requests
from read_service.watch import ChangeFeed
from shared_kernel.contracts import errors
from shared_kernel.contracts.event_log import NewEvent, read_positioned
from tessera.events.v1.envelope_pb2 import EventEnvelope
from tessera.orders.v1 import order_query_service_pb2 as opb
from tessera.orders.v1.order_pb2 import OrderStatus
from tessera.orders.v1.order_query_service_pb2 import OrderView
from tessera.orders.v1.order_query_service_pb2_grpc import OrderQueryServiceStub
from tests.unit.read_service.order_events import Events

from .conftest import EventLog, Publisher, StartProjector, UserFactory, dump_keyspace, eventually, make_projector
from .test_lease import two_projectors
from .test_service import health_status, settings_for

pytestmark = pytest.mark.integration

BROKEN_PAYLOAD = "UPDATE outbox SET payload = '\\xffff'::bytea WHERE event_id = $1"
StartOrders = Callable[..., asyncio.Future[Projector]]


class Story:
    """Two orders of one customer; o1's payment authorization is the poison event."""

    def __init__(self) -> None:
        self.events = Events()
        users = UserFactory()
        customer, registered = users.register("ada@example.com", "ada", "Ada Lovelace")
        anvil, added = self.events.add_product("ABC-1", "Anvil", 1999, 100)
        ev = self.events
        self.o1, placed1 = ev.place(customer, [(anvil, 1)])
        self.o2, placed2 = ev.place(customer, [(anvil, 2)])
        self.poison = ev.authorize(self.o1)
        # Before the projector starts: caught up from the log.
        self.first: list[NewEvent] = [registered, added, placed1, placed2, *ev.reserve(self.o1), self.poison]
        # After: live, interleaved; o1's three events wait behind the poison one.
        self.later: list[NewEvent] = [
            *ev.reserve(self.o2),
            ev.authorize(self.o2),
            ev.capture(self.o1),
            ev.capture(self.o2),
            ev.confirm(self.o1),
            ev.confirm(self.o2),
            ev.ship(self.o1),
        ]


@pytest.fixture
async def start_orders(
    redis_server_url: str, db_pool: asyncpg.Pool[Any], redis_client: aioredis.Redis
) -> AsyncIterator[Callable[..., Any]]:
    """Start orders projectors (each with its own Redis client); stop them after the test."""
    started: list[tuple[Projector, aioredis.Redis]] = []

    async def start(prefix: str, **settings: Any) -> Projector:
        client = aioredis.Redis.from_url(redis_server_url, socket_timeout=5)
        settings.setdefault("backoff_initial_s", 0.05)
        settings.setdefault("backoff_max_s", 0.5)
        settings.setdefault("probe_interval_s", 0.1)
        projector = make_projector(client, db_pool, OrdersProjection(OrderKeys(prefix)), prefix, **settings)
        started.append((projector, client))
        projector.start()
        return projector

    yield start
    for projector, client in reversed(started):
        await projector.stop()
        await client.aclose()


async def order_view(client: aioredis.Redis, prefix: str, order_id: str) -> OrderView:
    raw = await client.get(OrderKeys(prefix).view(order_id))
    assert isinstance(raw, bytes)
    return OrderView.FromString(raw)


def _text(raw: bytes | str | None) -> str:
    assert raw is not None
    return raw.decode() if isinstance(raw, bytes) else raw


def comparable(dump: dict[str, Any]) -> dict[str, Any]:
    """A key space's views, checkpoint and parked records, without what differs by who wrote them."""
    result: dict[str, Any] = {}
    for name, value in dump.items():
        if name.startswith("meta:") or name.endswith((":parking-requests", ":fingerprint")):
            continue
        result[name] = value
        if name.endswith(":parked"):
            result[name] = {
                field: {k: v for k, v in json.loads(raw).items() if k not in ("parked_at", "generation")}
                for field, raw in value.items()
            }
    return result


async def rebuilt(client: aioredis.Redis, pool: asyncpg.Pool[Any], live: str, reference: str) -> dict[str, Any]:
    """The orders key space rebuilt from the log under `reference`, honouring the skips recorded under `live`."""
    skips: dict[Any, Any] = await client.hgetall(skips_key(live, "orders"))
    if skips:
        await client.hset(skips_key(reference, "orders"), mapping=skips)
    result = await rebuild(client, pool, reference, registered_projections()["orders"], grace_s=0)
    return comparable(await dump_keyspace(client, keyspace_prefix(reference, "orders", result.generation)))


async def live_state(client: aioredis.Redis, live: str) -> dict[str, Any]:
    return comparable(await dump_keyspace(client, live))


async def publish_all(publisher: Publisher, envelopes: list[EventEnvelope]) -> None:
    for envelope in envelopes:
        await publisher.event(envelope)
    await publisher.head(envelopes[-1].position)


async def test_a_poison_order_event_parks_only_that_order_and_a_retry_after_a_fix_settles_it(
    event_log: EventLog,
    start_orders: Callable[..., Any],
    db_pool: asyncpg.Pool[Any],
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    story = Story()
    live = f"{redis_prefix}live:"
    first = await event_log.append(*story.first)
    original = await db_pool.fetchval("SELECT payload FROM outbox WHERE event_id = $1", story.poison.event_id)
    await db_pool.execute(BROKEN_PAYLOAD, story.poison.event_id)
    poison_at = first[-1].position

    applied: list[int] = []
    projector = await start_orders(live, on_applied=applied.append)
    await eventually(lambda: projector.ready and story.o1 in projector.parked_aggregates)
    later = await event_log.append(*story.later)
    await publish_all(Publisher(redis_client, live), later)
    head = later[-1].position
    await eventually(lambda: projector.checkpoint == head, message="the other orders stopped")

    # The checkpoint moved by exactly one per position, each once, the poison one included.
    assert applied == list(range(1, head + 1))
    status = projector.status()
    assert projector.parked is None and (status.poison_events, status.parked_aggregates) == (1, 1)
    # o2 went on; o1 stays as it was before the poison event.
    assert (await order_view(redis_client, live, story.o2)).status == OrderStatus.ORDER_STATUS_CONFIRMED
    assert (await order_view(redis_client, live, story.o1)).status == OrderStatus.ORDER_STATUS_RESERVED
    ((field, record),) = await parked_aggregates(redis_client, live, "orders")
    assert field == f"order/{story.o1}" and record.position == poison_at
    assert "PoisonEvent" in record.error
    # Its capture, confirm and ship wait behind it.
    assert (record.held, record.last_position) == (3, head)
    assert projector.published.parked_position(story.o1) == poison_at
    assert projector.published.parked_position(story.o2) is None
    # A rebuild parks the same order at the same place and builds the same views.
    assert await live_state(redis_client, live) == await rebuilt(redis_client, db_pool, live, f"{redis_prefix}r1:")

    # A retry before the fix: still parked there, recorded with who and why.
    await request(redis_client, live, "orders", story.o1, "retry", by="oncall", reason="transient?")
    await eventually(lambda: _no_requests(redis_client, live))
    ((_, still),) = await parked_aggregates(redis_client, live, "orders")
    assert still.position == poison_at and still.held == 3
    done, asked = [json.loads(raw) for raw in await redis_client.lrange(log_key(live, "orders"), 0, 1)]
    assert (asked["action"], asked["by"], asked["reason"], asked["outcome"]) == (
        "retry",
        "oncall",
        "transient?",
        "requested",
    )
    assert done["outcome"].startswith(f"still parked at {poison_at}") and done["by"] == "oncall"

    # Fixed (here: the payload mended), a retry applies o1's events in order: the views equal a rebuild.
    await db_pool.execute("UPDATE outbox SET payload = $1 WHERE event_id = $2", original, story.poison.event_id)
    await request(redis_client, live, "orders", story.o1, "retry", by="oncall", reason="payload mended")
    await eventually(lambda: _settled(projector, redis_client, live))
    assert (await order_view(redis_client, live, story.o1)).status == OrderStatus.ORDER_STATUS_SHIPPED
    assert projector.checkpoint == head
    assert await live_state(redis_client, live) == await rebuilt(redis_client, db_pool, live, f"{redis_prefix}r2:")
    done = json.loads(_text(await redis_client.lindex(log_key(live, "orders"), 0)))
    assert (done["outcome"], done["reason"]) == ("settled", "payload mended")

    # Later events of o1 apply as usual again.
    ship_again = story.events.ship(story.o1, tracking="JD0999")
    (envelope,) = await event_log.append(ship_again)
    await publish_all(Publisher(redis_client, live), [envelope])
    await eventually(lambda: projector.checkpoint == envelope.position)
    assert await live_state(redis_client, live) == await rebuilt(redis_client, db_pool, live, f"{redis_prefix}r3:")


async def _no_requests(client: aioredis.Redis, live: str) -> bool:
    return not await pending_requests(client, live, "orders")


async def _settled(projector: Projector, client: aioredis.Redis, live: str) -> bool:
    return not projector.parked_aggregates and not await parked_aggregates(client, live, "orders")


async def test_an_operator_skip_drops_the_first_parked_event_and_applies_the_rest(
    event_log: EventLog,
    start_orders: Callable[..., Any],
    db_pool: asyncpg.Pool[Any],
    redis_client: aioredis.Redis,
    redis_server_url: str,
    database_url: str,
    redis_prefix: str,
) -> None:
    story = Story()
    live = f"{redis_prefix}live:"
    first = await event_log.append(*story.first, *story.later)
    await db_pool.execute(BROKEN_PAYLOAD, story.poison.event_id)
    poison_at = first[len(story.first) - 1].position
    projector = await start_orders(live)
    await eventually(lambda: projector.ready and projector.checkpoint == first[-1].position)
    env = {**os.environ, "REDIS_URL": redis_server_url, "REDIS_KEY_PREFIX": live, "DATABASE_URL": database_url}

    def admin(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "read_service.admin", *args],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    listed = await asyncio.to_thread(admin, "parked", "--json")
    assert listed.returncode == 0, listed.stderr
    (line,) = listed.stdout.splitlines()
    row = json.loads(line)
    assert (row["scope"], row["aggregate_id"], row["position"], row["held"]) == ("aggregate", story.o1, poison_at, 3)

    unexplained = await asyncio.to_thread(admin, "skip", "--projection", "orders", "--aggregate", story.o1)
    assert unexplained.returncode == 2 and "--reason is required" in unexplained.stderr
    unknown = await asyncio.to_thread(admin, "retry", "--projection", "orders", "--aggregate", story.o2)
    assert unknown.returncode == 1 and f"no aggregate '{story.o2}' is parked" in unknown.stderr

    skipped = await asyncio.to_thread(
        admin, "skip", "--projection", "orders", "--aggregate", story.o1, "--operator", "alice", "--reason", "bad bytes"
    )
    assert skipped.returncode == 0, skipped.stderr
    assert "settled: its events are applied" in skipped.stdout
    assert not projector.parked_aggregates
    record = json.loads(
        _text(await redis_client.hget(skips_key(live, "orders"), skip_field(OrdersProjection.version, poison_at)))
    )
    assert (record["by"], record["reason"]) == ("alice", "bad bytes")
    # The authorization is gone for good; the capture, confirm and ship of o1 are applied.
    assert await live_state(redis_client, live) == await rebuilt(redis_client, db_pool, live, f"{redis_prefix}ref:")
    empty = await asyncio.to_thread(admin, "parked")
    assert empty.stdout.strip() == "no parked events"


async def test_projection_parking_is_the_switch_back_to_stopping_the_whole_projection(
    event_log: EventLog,
    start_orders: Callable[..., Any],
    db_pool: asyncpg.Pool[Any],
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    story = Story()
    live = f"{redis_prefix}live:"
    envelopes = await event_log.append(*story.first, *story.later)
    await db_pool.execute(BROKEN_PAYLOAD, story.poison.event_id)
    poison_at = envelopes[len(story.first) - 1].position
    projector = await start_orders(live, parking=ParkingMode.PROJECTION)
    await eventually(lambda: projector.ready and projector.parked is not None)
    assert projector.checkpoint == poison_at - 1
    assert projector.parked is not None and projector.parked.position == poison_at
    assert not projector.parked_aggregates
    # o2's later events are not applied either.
    assert (await order_view(redis_client, live, story.o2)).status == OrderStatus.ORDER_STATUS_PENDING


async def test_queries_of_a_parked_order_are_stale_with_its_position_and_other_orders_are_not(
    event_log: EventLog,
    db_pool: asyncpg.Pool[Any],
    database_url: str,
    redis_server_url: str,
    redis_prefix: str,
) -> None:
    story = Story()
    envelopes = await event_log.append(*story.first, *story.later)
    await db_pool.execute(BROKEN_PAYLOAD, story.poison.event_id)
    poison_at = envelopes[len(story.first) - 1].position
    settings = settings_for(database_url, redis_server_url, redis_prefix)
    assert settings.parking_mode is ParkingMode.AGGREGATE  # the default
    async with running_read_service(settings) as service:
        orders = service.projectors[2]
        await eventually(lambda: orders.ready and orders.checkpoint == envelopes[-1].position)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:

            async def serving() -> bool:
                status: int = await health_status(channel)
                return status == int(health_pb2.HealthCheckResponse.SERVING)

            await eventually(serving, message="a parked order stopped the replica from serving")
            stub = OrderQueryServiceStub(channel)
            call = stub.GetOrder(opb.GetOrderRequest(order_id=story.o1), timeout=5)
            reply = await call
            headers = dict(await call.initial_metadata())
            assert reply.stale and reply.order.status == OrderStatus.ORDER_STATUS_RESERVED
            assert headers[PARKED_HEADER] == str(poison_at) and headers[STALE_HEADER] == "true"
            call = stub.GetOrder(opb.GetOrderRequest(order_id=story.o2), timeout=5)
            reply = await call
            assert not reply.stale and PARKED_HEADER not in dict(await call.initial_metadata())
            assert reply.order.status == OrderStatus.ORDER_STATUS_CONFIRMED


class Replaying:
    """A replica that applies nothing and replays every event from the log, seeing the leader's parked set."""

    def __init__(self, leader: Projector) -> None:
        self._leader = leader

    @property
    def ready(self) -> bool:
        return self._leader.ready

    @property
    def checkpoint(self) -> int:
        return self._leader.checkpoint

    @property
    def generation(self) -> str | None:
        return self._leader.generation

    @property
    def published(self) -> PublishedState:
        return self._leader.published

    def changed(self) -> asyncio.Event:
        return self._leader.changed()


async def test_watches_skip_held_events_live_and_replayed_and_end_when_an_operator_settles(
    event_log: EventLog,
    users: UserFactory,
    publisher: Publisher,
    start_projector: StartProjector,
    db_pool: asyncpg.Pool[Any],
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    projector = await start_projector(probe_interval_s=0.1)
    own = ChangeFeed(projector, UsersProjection(UserKeys(redis_prefix)), redis_client, db_pool, recheck_s=0.05)
    projector.effect_listeners = (own.on_effect,)
    projector.resolution_listeners = (own.on_resolved,)
    replayed = ChangeFeed(
        Replaying(projector), UsersProjection(UserKeys(redis_prefix)), redis_client, db_pool, recheck_s=0.05
    )
    first_id, first = users.register("first@example.com", "first")
    second_id, second = users.register("second@example.com", "second")
    await publish_all(publisher, await event_log.append(first, second))
    await eventually(lambda: projector.ready and projector.checkpoint == 2)
    keys = [UserKeys(redis_prefix).view(first_id), UserKeys(redis_prefix).view(second_id)]
    own.start()
    replayed.start()
    try:
        await eventually(lambda: own.released == 2 and replayed.released == 2)
        watches = [await own.open(keys), await replayed.open(keys)]
        broken, held, other = (
            users.update(first_id, "bad"),
            users.update(first_id, "later"),
            users.update(second_id, "x"),
        )
        await event_log.append(broken, held, other)
        original = await db_pool.fetchval("SELECT payload FROM outbox WHERE event_id = $1", broken.event_id)
        await db_pool.execute(BROKEN_PAYLOAD, broken.event_id)
        # Published as the log has them now: the relay reads the payload from its row.
        await publish_all(publisher, await read_positioned(db_pool, 2, 3))
        await eventually(lambda: own.released == 5 and replayed.released == 5)
        # The first user's two updates changed nothing, computed here or replayed from the log:
        # the first change either watch sees is the second user's.
        for watch in watches:
            change = await anext(aiter(watch.changes()))
            assert (change.key, change.position) == (keys[1], 5)

        await db_pool.execute("UPDATE outbox SET payload = $1 WHERE event_id = $2", original, broken.event_id)
        await request(redis_client, redis_prefix, "users", first_id, "retry", by="oncall", reason="mended")
        await eventually(lambda: not projector.parked_aggregates)
        # The settled views changed without a new position: the watch of them starts over.
        with pytest.raises(errors.Unavailable):
            await anext(aiter(watches[0].changes()))
    finally:
        await own.close()
        await replayed.close()


async def test_a_lease_follower_marks_the_holders_parked_aggregates_and_notices_them_settled(
    event_log: EventLog,
    users: UserFactory,
    publisher: Publisher,
    start_projector: StartProjector,
    db_pool: asyncpg.Pool[Any],
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    holder, follower = await two_projectors(start_projector, probe_interval_s=0.1)
    settled_elsewhere: list[Any] = []
    follower.resolution_listeners = (settled_elsewhere.append,)
    user_id, registered = users.register("ada@example.com", "ada")
    broken = users.update(user_id, "bad")
    await event_log.append(registered, broken)
    original = await db_pool.fetchval("SELECT payload FROM outbox WHERE event_id = $1", broken.event_id)
    await db_pool.execute(BROKEN_PAYLOAD, broken.event_id)
    await publish_all(publisher, await read_positioned(db_pool, 0, 2))
    # Queries on the follower mark the aggregate as the holder's do.
    await eventually(lambda: follower.checkpoint == 2 and user_id in follower.parked_aggregates)
    assert follower.published.parked_position(user_id) == 2
    assert holder.published.parked_position(user_id) == 2

    await db_pool.execute("UPDATE outbox SET payload = $1 WHERE event_id = $2", original, broken.event_id)
    await request(redis_client, redis_prefix, "users", user_id, "retry", by="oncall", reason="mended")
    await eventually(lambda: not holder.parked_aggregates and not follower.parked_aggregates)
    # The follower cannot know which keys the holder's settle wrote: its caches and watches start over.
    assert settled_elsewhere == [None]
