"""The projector against a real Postgres event log and a real Redis."""

from __future__ import annotations

import collections
import random

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from read_service.keys import SortField, Subset, UserKeys
from read_service.projector import ParkingMode, ProjectorState
from shared_kernel.contracts.event_log import NewEvent
from tessera.events.v1.envelope_pb2 import StreamHead
from tessera.users.v1.user_query_service_pb2 import UserView

from .conftest import EventLog, Publisher, StartProjector, UserFactory, dump_keyspace, eventually

pytestmark = pytest.mark.integration


def story(users: UserFactory, count: int) -> tuple[list[NewEvent], dict[str, int], set[str]]:
    """Registrations, profile updates and deactivations in a fixed pseudo-random order."""
    rng = random.Random(count)
    events: list[NewEvent] = []
    ids: list[str] = []
    inactive: set[str] = set()
    while len(events) < count:
        roll = rng.random()
        if not ids or roll < 0.4:
            n = len(ids)
            user_id, event = users.register(f"User{n}@Example.com", f"user{n}", f"User Number {n}")
            ids.append(user_id)
            events.append(event)
        elif roll < 0.85:
            user_id = rng.choice(ids)
            events.append(users.update(user_id, f"Renamed {len(events)}", bio=str(len(events))))
        else:
            user_id = rng.choice(ids)
            events.append(users.deactivate(user_id, reason=f"reason {len(events)}"))
            inactive.add(user_id)
    return events, dict(users.versions), inactive


async def view_of(redis_client, prefix: str, user_id: str) -> UserView | None:
    raw = await redis_client.get(UserKeys(prefix).view(user_id))
    return None if raw is None else UserView.FromString(raw)


async def assert_views(redis_client, prefix: str, versions: dict[str, int], inactive: set[str]) -> None:
    keys = UserKeys(prefix)
    for user_id, version in versions.items():
        view = await view_of(redis_client, prefix, user_id)
        assert view is not None, user_id
        assert view.version == version
        assert view.active is (user_id not in inactive)
    stats = await redis_client.hgetall(keys.stats)
    assert int(stats[b"users"]) == len(versions)
    assert int(stats[b"active_users"]) == len(versions) - len(inactive)
    for sort in SortField:
        assert await redis_client.zcard(keys.index(sort, Subset.ALL)) == len(versions)
        assert await redis_client.zcard(keys.index(sort, Subset.INACTIVE)) == len(inactive)
        assert await redis_client.zcard(keys.index(sort, Subset.ACTIVE)) == len(versions) - len(inactive)


async def test_start_up_catches_up_from_the_event_log(
    event_log: EventLog, users: UserFactory, start_projector: StartProjector, redis_client, redis_prefix
):
    events, versions, inactive = story(users, 40)
    await event_log.append(*events[:25])
    await event_log.append(*events[25:])
    applied: list[int] = []

    projector = await start_projector(batch_size=7, on_applied=applied.append)
    await eventually(lambda: projector.ready, message="projector never became ready")

    assert projector.checkpoint == 40
    assert applied == list(range(1, 41))
    status = projector.status()
    assert status.state is ProjectorState.LIVE
    assert status.applied == 40
    assert status.head == 40
    assert status.last_applied_at is not None
    assert await redis_client.get(UserKeys(redis_prefix).checkpoint) == b"40"
    await assert_views(redis_client, redis_prefix, versions, inactive)


async def test_ready_on_an_empty_log(start_projector: StartProjector, redis_client, redis_prefix):
    projector = await start_projector()
    assert not projector.ready
    await eventually(lambda: projector.ready)
    assert projector.checkpoint == 0
    assert await redis_client.get(UserKeys(redis_prefix).checkpoint) is None


async def test_every_event_delivered_twice_is_applied_once(
    event_log: EventLog,
    users: UserFactory,
    publisher: Publisher,
    start_projector: StartProjector,
    redis_client,
    redis_prefix,
):
    applied: list[int] = []
    projector = await start_projector(on_applied=applied.append)
    await eventually(lambda: projector.ready)
    events, versions, inactive = story(users, 30)

    envelopes = []
    for event in events:
        (envelope,) = await event_log.append(event)
        envelopes.append(envelope)
        await publisher.event(envelope)
        await publisher.event(envelope)
    await eventually(lambda: projector.checkpoint == 30, message=f"stuck at {projector.checkpoint}")
    before = await dump_keyspace(redis_client, redis_prefix)
    # The whole stream once more, after the fact: nothing may change.
    for envelope in envelopes:
        await publisher.event(envelope)
    await publisher.head(30)
    await eventually(lambda: projector.status().duplicates >= 60)

    assert applied == list(range(1, 31))
    assert await dump_keyspace(redis_client, redis_prefix) == before
    await assert_views(redis_client, redis_prefix, versions, inactive)


async def test_a_gap_in_live_messages_is_filled_from_the_log_in_order(
    event_log: EventLog,
    users: UserFactory,
    publisher: Publisher,
    start_projector: StartProjector,
    redis_client,
    redis_prefix,
):
    applied: list[int] = []
    projector = await start_projector(on_applied=applied.append)
    await eventually(lambda: projector.ready)
    user_id, registered = users.register("gap@example.com", "gap", "Name 1")
    events = [registered] + [users.update(user_id, f"Name {n}") for n in range(2, 11)]
    envelopes = await event_log.append(*events)

    # Pub/sub lost 3, 4, 6, 7, 8 and 10: only these arrive.
    for position in (1, 2, 5, 9):
        await publisher.event(envelopes[position - 1])
    await eventually(lambda: projector.checkpoint == 10, message=f"stuck at {projector.checkpoint}")

    # Applied once each, strictly in position order, although 5 and 9 arrived early.
    assert applied == list(range(1, 11))
    view = await view_of(redis_client, redis_prefix, user_id)
    assert view is not None
    assert (view.full_name, view.version) == ("Name 10", 10)
    assert projector.status().catch_ups >= 2


async def test_a_heartbeat_ahead_of_the_checkpoint_triggers_a_catch_up(
    event_log: EventLog,
    users: UserFactory,
    publisher: Publisher,
    start_projector: StartProjector,
    redis_client,
    redis_prefix,
):
    applied: list[int] = []
    projector = await start_projector(on_applied=applied.append)
    await eventually(lambda: projector.ready)
    user_id, registered = users.register("tail@example.com", "tail")
    await event_log.append(registered, users.update(user_id, "Tail End"))

    # Every event message was lost; the relay's heartbeat says the stream is at 2.
    await publisher.head(2)
    await eventually(lambda: projector.checkpoint == 2)

    assert applied == [1, 2]
    assert projector.status().head == 2
    view = await view_of(redis_client, redis_prefix, user_id)
    assert view is not None and view.full_name == "Tail End"


async def test_two_projectors_sharing_a_key_space_build_the_same_views_as_one(
    event_log: EventLog,
    users: UserFactory,
    redis_server_url,
    start_projector: StartProjector,
    redis_client,
    redis_prefix,
):
    shared = f"{redis_prefix}shared:"
    single = f"{redis_prefix}single:"
    events, versions, inactive = story(users, 400)
    await event_log.append(*events[:300])
    applied: list[int] = []

    # Small, different batch sizes make the two interleave during catch-up.
    first = await start_projector(prefix=shared, batch_size=5, on_applied=applied.append)
    second = await start_projector(prefix=shared, batch_size=7, on_applied=applied.append)
    await eventually(lambda: first.ready and second.ready)
    live = Publisher(redis_client, shared)
    for event in events[300:]:
        (envelope,) = await event_log.append(event)
        await live.event(envelope)
        await live.event(envelope)
    await eventually(lambda: first.checkpoint == 400 and second.checkpoint == 400)

    reference = await start_projector(prefix=single, batch_size=1000)
    await eventually(lambda: reference.ready and reference.checkpoint == 400)

    counts = collections.Counter(applied)
    assert set(counts) == set(range(1, 401))
    assert max(counts.values()) == 1, "an event was applied twice"
    assert await dump_keyspace(redis_client, shared) == await dump_keyspace(redis_client, single)
    await assert_views(redis_client, shared, versions, inactive)


async def test_a_lost_pubsub_connection_is_followed_by_a_catch_up(
    event_log: EventLog,
    users: UserFactory,
    publisher: Publisher,
    start_projector: StartProjector,
    redis_client,
    redis_prefix,
):
    name = f"projector-{redis_prefix.replace(':', '-')}"
    projector = await start_projector(client_name=name)
    await eventually(lambda: projector.ready)
    catch_ups = projector.status().catch_ups

    for client in await redis_client.client_list():
        if client.get("name") == name and int(client.get("sub", 0)) > 0:
            await redis_client.client_kill_filter(_id=client["id"])
            break
    else:
        raise AssertionError("the projector's pub/sub connection was not found")
    user_id, event = users.register("lost@example.com", "lost")
    (envelope,) = await event_log.append(event)
    await publisher.event(envelope)  # may well be lost: the log still has it

    await eventually(lambda: projector.checkpoint == 1, message="the event never arrived")
    await eventually(lambda: projector.status().catch_ups > catch_ups)
    assert (await view_of(redis_client, redis_prefix, user_id)) is not None


async def test_a_wiped_key_space_is_rebuilt_and_reported_not_ready_meanwhile(
    event_log: EventLog,
    users: UserFactory,
    start_projector: StartProjector,
    redis_client,
    redis_prefix,
):
    main = f"{redis_prefix}main:"
    readiness: list[bool] = []

    async def record(ready: bool) -> None:
        readiness.append(ready)

    await event_log.append(*(users.register(f"w{n}@example.com", f"w{n}")[1] for n in range(5)))
    projector = await start_projector(prefix=main, on_readiness_change=record)
    await eventually(lambda: projector.ready and projector.checkpoint == 5)

    # Redis lost everything, e.g. restarted without persistence.
    keys = [k async for k in redis_client.scan_iter(match=f"{main}*")]
    await redis_client.delete(*keys)
    _, event = users.register("after@example.com", "after")
    (envelope,) = await event_log.append(event)
    await Publisher(redis_client, main).event(envelope)

    await eventually(lambda: projector.checkpoint == 6 and projector.ready)
    assert readiness == [True, False, True]
    reference = await start_projector(prefix=f"{redis_prefix}reference:")
    await eventually(lambda: reference.ready)
    assert await dump_keyspace(redis_client, main) == await dump_keyspace(redis_client, f"{redis_prefix}reference:")


async def test_unknown_events_advance_the_checkpoint_and_unreadable_ones_park(
    event_log: EventLog,
    users: UserFactory,
    start_projector: StartProjector,
    db_pool,
    redis_client,
    redis_prefix,
):
    foreign = NewEvent(StreamHead(position=1), "other", "x", 1, users._tick())
    _, broken = users.register("broken@example.com", "broken")
    user_id, good = users.register("good@example.com", "good")
    await event_log.append(foreign, broken, good)
    await db_pool.execute("UPDATE outbox SET payload = '\\xffff'::bytea WHERE event_id = $1", broken.event_id)

    projector = await start_projector(parking=ParkingMode.PROJECTION)
    await eventually(lambda: projector.ready and projector.parked is not None)

    # The foreign event changes nothing but the checkpoint; the unreadable one stops the projection
    # (tests/integration/read_service/test_parked.py follows it further).
    assert projector.checkpoint == 1
    assert projector.status().poison_events == 1
    assert (await view_of(redis_client, redis_prefix, user_id)) is None
    assert (await view_of(redis_client, redis_prefix, broken.aggregate_id)) is None


async def test_stop_is_idempotent_and_reports_stopped(start_projector: StartProjector):
    projector = await start_projector()
    await eventually(lambda: projector.ready)
    await projector.stop()
    await projector.stop()
    assert projector.status().state is ProjectorState.STOPPED
    assert projector.task is not None and projector.task.cancelled()


async def test_wait_for_checkpoint(
    event_log: EventLog, users: UserFactory, publisher: Publisher, start_projector: StartProjector
):
    projector = await start_projector()
    await eventually(lambda: projector.ready)
    assert not await projector.wait_for_checkpoint(1, timeout_s=0.05)
    (envelope,) = await event_log.append(users.register("w@example.com", "w")[1])
    await publisher.event(envelope)
    assert await projector.wait_for_checkpoint(1, timeout_s=10)


async def test_each_applied_event_continues_the_trace_of_its_command(
    event_log: EventLog, users: UserFactory, publisher: Publisher, start_projector: StartProjector
):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")

    # One event is written before the projector starts (catch-up), one after (live).
    with tracer.start_as_current_span("command 1", kind=trace.SpanKind.SERVER) as command_1:
        _, first = users.register("t1@example.com", "t1")
        await event_log.append(first)
    projector = await start_projector(tracer=tracer)
    await eventually(lambda: projector.ready)
    with tracer.start_as_current_span("command 2", kind=trace.SpanKind.SERVER) as command_2:
        _, second = users.register("t2@example.com", "t2")
        (envelope,) = await event_log.append(second)
    await publisher.event(envelope)
    await eventually(lambda: projector.checkpoint == 2)

    consumers = [s for s in exporter.get_finished_spans() if s.kind is trace.SpanKind.CONSUMER]
    assert len(consumers) == 2
    for span, command in zip(consumers, (command_1, command_2), strict=True):
        parent = command.get_span_context()
        assert span.parent is not None
        assert (span.context.trace_id, span.parent.span_id) == (parent.trace_id, parent.span_id)
        assert span.attributes is not None
        assert span.attributes["tessera.projection.outcome"] == "applied"
    provider.shutdown()
