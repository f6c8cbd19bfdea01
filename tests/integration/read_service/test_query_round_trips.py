"""A cold single-view query is one Redis command, with a consistency token too; a list query reads its
checkpoint in the round trip of its first read; a token the near cache already reflects costs no Redis call."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis

from devstack.servers import EmbeddedRedis
from read_service.consistency import ConsistencyGate, log_versions
from read_service.entrypoints.grpc_server import SERVICE_NAME, UserQueryServicer, register_user_queries
from read_service.keys import UserKeys
from read_service.near_cache import NearCache
from read_service.page_tokens import PageTokenCodec
from read_service.projections.users import UsersProjection
from read_service.projector import Projector
from read_service.view_store import ViewReader
from read_service.views.users import UserViews
from read_service.watch import ChangeFeed
from shared_kernel.contracts.consistency import encode_token
from shared_kernel.platform.grpc_server import GrpcServer
from shared_kernel.platform.settings import GrpcServerSettings
from tessera.users.v1 import user_query_service_pb2 as pb
from tessera.users.v1.user_query_service_pb2_grpc import UserQueryServiceStub

if TYPE_CHECKING:
    from tessera.users.v1.user_query_service_pb2_grpc import UserQueryServiceAsyncStub

from tests.integration.read_service.packet_recording import RecordingConnection

from .conftest import EventLog, Publisher, StartProjector, UserFactory, eventually
from .test_near_cache_hits import commands_on, publish

pytestmark = pytest.mark.integration

# The name (CLIENT SETNAME) of the views' connections: the commands a query sends are the
# commands of these connections; the projector's run on the same keys meanwhile.
VIEWS_CLIENT = "round-trip-test-views"


@pytest.fixture
async def stub_and_projector(
    start_projector: StartProjector, redis_server_url: str, redis_prefix: str, db_pool: asyncpg.Pool[Any]
) -> AsyncIterator[tuple[UserQueryServiceAsyncStub, Projector]]:
    """A UserQueryService whose views read through a client of their own, named VIEWS_CLIENT."""
    projector = await start_projector()
    await eventually(lambda: projector.ready)
    client = aioredis.Redis.from_url(redis_server_url, client_name=VIEWS_CLIENT)
    views = UserViews(client, UserKeys(redis_prefix))
    servicer = UserQueryServicer(
        views,
        PageTokenCodec(b"round-trip-test-page-token-secret"),
        lambda: projector.ready,
        gate=ConsistencyGate(projector, views.version, log_versions(db_pool)),
        checkpoint=projector.read_checkpoint,
    )
    server = GrpcServer(GrpcServerSettings(grpc_host="127.0.0.1", grpc_port=0, grpc_shutdown_grace_s=1), [SERVICE_NAME])
    server.add(register_user_queries, servicer)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub: UserQueryServiceAsyncStub = UserQueryServiceStub(channel)
            yield stub, projector
    finally:
        await server.stop()
        await client.aclose()


def _kinds(commands: list[str]) -> list[str]:
    return sorted(command.split()[0].strip("'\"").upper() for command in commands)


async def test_get_user_reads_checkpoint_and_view_in_one_pipeline_with_or_without_a_token(
    stub_and_projector: tuple[UserQueryServiceAsyncStub, Projector],
    event_log: EventLog,
    users: UserFactory,
    publisher: Publisher,
    redis_server_url: str,
    redis_prefix: str,
) -> None:
    stub, projector = stub_and_projector
    user_id, registered = users.register("once@example.com", "once")
    await publish(event_log, publisher, registered, users.update(user_id, "Renamed"))
    await eventually(lambda: projector.checkpoint == 2)
    token = encode_token("user", user_id, 2)

    for request in (pb.GetUserRequest(user_id=user_id), pb.GetUserRequest(user_id=user_id, consistency_token=token)):
        async with commands_on(redis_server_url, redis_prefix, VIEWS_CLIENT) as seen:
            call = stub.GetUser(request, timeout=5)
            reply = await call
        # One command (the read script) that reads the checkpoint, the view and what the user
        # spent: no separate read of the version or the checkpoint.
        assert _kinds(seen) == ["EVALSHA", "GET", "GET", "HGETALL"], seen
        assert reply.user.version == 2 and reply.user.full_name == "Renamed"
        assert reply.view_position == 2 and not reply.stale
        assert "x-tessera-stale" not in dict(await call.initial_metadata())


async def test_a_token_ahead_of_the_view_is_answered_once_the_view_reflects_it(
    stub_and_projector: tuple[UserQueryServiceAsyncStub, Projector],
    event_log: EventLog,
    users: UserFactory,
    publisher: Publisher,
) -> None:
    stub, projector = stub_and_projector
    user_id, registered = users.register("later@example.com", "later")
    await publish(event_log, publisher, registered)
    await eventually(lambda: projector.checkpoint == 1)
    # Version 2 is in the log but not yet published: the query waits for it, then answers it.
    update = users.update(user_id, "Arrives Later")
    envelopes = await event_log.append(update)
    call = stub.GetUser(
        pb.GetUserRequest(user_id=user_id, consistency_token=encode_token("user", user_id, 2), max_wait_ms=5000),
        timeout=10,
    )
    for envelope in envelopes:
        await publisher.event(envelope)
    reply = await call
    assert reply.user.version == 2 and reply.user.full_name == "Arrives Later"
    assert reply.view_position == 2 and not reply.stale


async def test_the_read_script_is_loaded_again_after_redis_forgets_it() -> None:
    # A throwaway Redis: SCRIPT FLUSH would drop the shared server's scripts for everyone.
    with EmbeddedRedis() as server:
        client = aioredis.Redis.from_url(server.url)
        try:
            await client.set("p:checkpoint", 7)
            await client.set("p:view", b"\x0a\x01x")
            await client.hset("p:spent", mapping={"EUR": 5})
            reader = ViewReader(client)
            first = await reader.read("p:checkpoint", "p:view", "p:spent")
            await client.script_flush()
            again = await reader.read("p:checkpoint", "p:view", "p:spent")
            absent = await reader.read("p:nothing", "p:nothing-either")
        finally:
            await client.aclose()
    assert first == again
    assert int(first.checkpoint or 0) == 7 and first.view == b"\x0a\x01x"
    assert first.hashes == [{b"EUR": b"5"}]
    assert absent.view is None and int(absent.checkpoint or 0) == 0 and absent.hashes == []


@pytest.fixture
async def cached_stub(
    start_projector: StartProjector,
    redis_client: aioredis.Redis,
    redis_server_url: str,
    redis_prefix: str,
    db_pool: asyncpg.Pool[Any],
) -> AsyncIterator[tuple[UserQueryServiceAsyncStub, Projector]]:
    """A UserQueryService wired as bootstrap wires it: a near cache kept by a change feed, views on their own client."""
    projector = await start_projector()
    await eventually(lambda: projector.ready)
    cache = NearCache("users", 100)
    feed = ChangeFeed(
        projector, UsersProjection(UserKeys(redis_prefix)), redis_client, db_pool, recheck_s=0.05, caches=[cache]
    )
    projector.effect_listeners = (feed.on_effect,)
    pool = aioredis.ConnectionPool.from_url(
        redis_server_url, connection_class=RecordingConnection, client_name=VIEWS_CLIENT
    )
    client = aioredis.Redis(connection_pool=pool)
    views = UserViews(client, UserKeys(redis_prefix), cache=cache)
    servicer = UserQueryServicer(
        views,
        PageTokenCodec(b"round-trip-test-page-token-secret"),
        lambda: projector.ready,
        gate=ConsistencyGate(projector, views.version, log_versions(db_pool)),
        checkpoint=cache.observe(projector.read_checkpoint),
    )
    server = GrpcServer(GrpcServerSettings(grpc_host="127.0.0.1", grpc_port=0, grpc_shutdown_grace_s=1), [SERVICE_NAME])
    server.add(register_user_queries, servicer)
    port = await server.start()
    feed.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub: UserQueryServiceAsyncStub = UserQueryServiceStub(channel)
            yield stub, projector
    finally:
        await feed.close()
        await server.stop()
        await client.aclose()


async def test_list_users_reads_its_checkpoint_in_the_round_trip_of_its_first_range(
    cached_stub: tuple[UserQueryServiceAsyncStub, Projector],
    event_log: EventLog,
    users: UserFactory,
    publisher: Publisher,
    redis_server_url: str,
    redis_prefix: str,
) -> None:
    stub, projector = cached_stub
    events = [users.register(f"list{n}@example.com", f"list{n}")[1] for n in range(3)]
    await publish(event_log, publisher, *events)
    await eventually(lambda: projector.checkpoint == 3)
    checkpoint_key = UserKeys(redis_prefix).checkpoint.encode()

    for request in (pb.ListUsersRequest(page_size=10), pb.GetUserByEmailRequest(email="list1@example.com")):
        RecordingConnection.packets.clear()
        async with commands_on(redis_server_url, redis_prefix, VIEWS_CLIENT) as seen:
            if isinstance(request, pb.ListUsersRequest):
                listed = await stub.ListUsers(request, timeout=5)
                assert len(listed.users) == 3 and listed.view_position == 3
            else:
                found = await stub.GetUserByEmail(request, timeout=5)
                assert found.user.username == "list1" and found.view_position == 3
        # The checkpoint is read once, by the views' client, in the same packet as the first read.
        assert sum("checkpoint" in command for command in seen) == 1, seen
        # (Packets without the test's prefix are the connection's own set-up.)
        packets = [packet for packet in RecordingConnection.packets if redis_prefix.encode() in packet]
        first = packets[0]
        assert checkpoint_key in first and (b"ZRANGE" in first or b"HGET" in first), packets
        assert not any(checkpoint_key in packet for packet in packets[1:])
        # Then one more: the views with what each user spent (ListUsers), or the view (by e-mail).
        assert len(packets) == 2, packets


async def test_a_token_the_near_cache_already_reflects_is_answered_without_redis(
    cached_stub: tuple[UserQueryServiceAsyncStub, Projector],
    event_log: EventLog,
    users: UserFactory,
    publisher: Publisher,
    redis_server_url: str,
    redis_prefix: str,
) -> None:
    stub, projector = cached_stub
    user_id, registered = users.register("cached@example.com", "cached")
    await publish(event_log, publisher, registered, users.update(user_id, "Renamed"))
    await eventually(lambda: projector.checkpoint == 2)
    await stub.GetUser(pb.GetUserRequest(user_id=user_id), timeout=5)  # fills the near cache

    for version in (1, 2):
        async with commands_on(redis_server_url, redis_prefix, VIEWS_CLIENT) as seen:
            call = stub.GetUser(
                pb.GetUserRequest(user_id=user_id, consistency_token=encode_token("user", user_id, version)),
                timeout=5,
            )
            reply = await call
        assert seen == []
        assert reply.user.version == 2 and reply.view_position == 2 and not reply.stale

    # A token ahead of the cached view goes to Redis (version 3 is in the log but never
    # published here, so the answer is stale).
    await event_log.append(users.update(user_id, "Unpublished"))
    async with commands_on(redis_server_url, redis_prefix, VIEWS_CLIENT) as seen:
        reply = await stub.GetUser(
            pb.GetUserRequest(user_id=user_id, consistency_token=encode_token("user", user_id, 3), max_wait_ms=100),
            timeout=5,
        )
    assert seen != []
    assert reply.user.version == 2 and reply.stale
