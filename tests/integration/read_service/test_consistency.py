"""Read your writes on a replica: queries with a consistency token wait for the projector."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import pytest
import redis.asyncio as aioredis

from read_service.bootstrap import ReadService, running_read_service
from shared_kernel.contracts.consistency import encode_token
from tessera.users.v1 import user_query_service_pb2 as pb
from tessera.users.v1.user_query_service_pb2_grpc import UserQueryServiceStub

if TYPE_CHECKING:
    from tessera.users.v1.user_query_service_pb2_grpc import UserQueryServiceAsyncStub

from .conftest import EventLog, Publisher, UserFactory, eventually
from .test_service import settings_for

pytestmark = pytest.mark.integration


@dataclass
class Replica:
    service: ReadService
    stub: UserQueryServiceAsyncStub
    user_id: str


@pytest.fixture
async def replica(
    database_url: str,
    redis_server_url: str,
    redis_prefix: str,
    event_log: EventLog,
    publisher: Publisher,
    users: UserFactory,
) -> AsyncIterator[Replica]:
    """A read service with one registered user (version 1) in its views."""
    user_id, registered = users.register("wait@example.com", "waiter")
    await event_log.append(registered)
    # Without the near cache: these tests are about what a query finds in Redis (a near-cache hit
    # makes no Redis call; how the cache forgets a lost key space: test_near_cache_hits.py).
    settings = settings_for(database_url, redis_server_url, redis_prefix).model_copy(update={"near_cache_size": 0})
    async with running_read_service(settings) as service:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
        stub: UserQueryServiceAsyncStub = UserQueryServiceStub(channel)
        try:

            async def visible() -> bool:
                try:
                    await stub.GetUser(pb.GetUserRequest(user_id=user_id), timeout=2)
                except grpc.aio.AioRpcError:
                    return False
                return True

            await eventually(visible, message="the user never became visible")
            yield Replica(service, stub, user_id)
        finally:
            await channel.close()


async def test_a_waiter_is_woken_by_the_apply_not_by_its_budget(
    replica: Replica, event_log: EventLog, publisher: Publisher, users: UserFactory
) -> None:
    # In the log but not yet published: the version exists, the replica has not seen it.
    (updated,) = await event_log.append(users.update(replica.user_id, "New Name"))
    token = encode_token("user", replica.user_id, 2)
    request = pb.GetUserRequest(user_id=replica.user_id, consistency_token=token, max_wait_ms=4000)
    call = replica.stub.GetUser(request, timeout=10)
    waiting = asyncio.ensure_future(call)
    done, _ = await asyncio.wait({waiting}, timeout=0.3)
    assert not done, "the query answered before the replica could reflect the token"
    published = time.monotonic()
    await publisher.event(updated)
    reply = await asyncio.wait_for(waiting, 5)
    woken_after = time.monotonic() - published
    assert woken_after < 1.0, f"the waiter took {woken_after:.3f} s after the apply"
    assert reply.user.version == 2 and reply.user.full_name == "New Name"
    assert not reply.stale
    assert reply.view_position == updated.position
    metadata = dict(await call.initial_metadata())
    assert "x-tessera-stale" not in metadata


async def test_a_token_already_reflected_answers_at_once(replica: Replica) -> None:
    token = encode_token("user", replica.user_id, 1)
    for request in (
        pb.GetUserRequest(user_id=replica.user_id, consistency_token=token),
        pb.GetUserByEmailRequest(email="wait@example.com", consistency_token=token),
        pb.ListUsersRequest(consistency_token=token),
    ):
        started = time.monotonic()
        method = {
            pb.GetUserRequest: replica.stub.GetUser,
            pb.GetUserByEmailRequest: replica.stub.GetUserByEmail,
            pb.ListUsersRequest: replica.stub.ListUsers,
        }[type(request)]
        reply = await method(request, timeout=5)  # type: ignore[operator]
        assert time.monotonic() - started < 1.0
        assert not reply.stale
        assert reply.view_position == replica.service.projector.checkpoint == 1


async def test_budget_expiry_answers_stale_with_the_header(
    replica: Replica, event_log: EventLog, users: UserFactory
) -> None:
    await event_log.append(users.update(replica.user_id, "Never Published"))
    token = encode_token("user", replica.user_id, 2)
    started = time.monotonic()
    call = replica.stub.GetUserByEmail(
        pb.GetUserByEmailRequest(email="wait@example.com", consistency_token=token, max_wait_ms=300), timeout=10
    )
    reply = await call
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 2.0
    assert reply.stale
    assert reply.user.version == 1
    metadata = dict(await call.initial_metadata())
    assert metadata.get("x-tessera-stale") == "true"


async def test_the_callers_deadline_caps_the_wait(replica: Replica, event_log: EventLog, users: UserFactory) -> None:
    await event_log.append(users.update(replica.user_id, "Never Published"))
    token = encode_token("user", replica.user_id, 2)
    # A wait past the caller's deadline would be DEADLINE_EXCEEDED; the answer comes stale instead.
    reply = await replica.stub.ListUsers(pb.ListUsersRequest(consistency_token=token, max_wait_ms=60_000), timeout=1)
    assert reply.stale


async def test_a_version_that_does_not_exist_fails_promptly(replica: Replica) -> None:
    token = encode_token("user", replica.user_id, 9)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await replica.stub.GetUser(
            pb.GetUserRequest(user_id=replica.user_id, consistency_token=token, max_wait_ms=4000), timeout=10
        )
    assert time.monotonic() - started < 1.0
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.details() == (
        f"consistency token refers to version 9 of user {replica.user_id}, which does not exist (current version 1)"
    )


@pytest.mark.parametrize("token", ["not a token", encode_token("order", "o-1", 1)])
async def test_garbage_or_foreign_tokens_are_invalid_argument(replica: Replica, token: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await replica.stub.ListUsers(pb.ListUsersRequest(consistency_token=token), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_query_that_finds_the_checkpoint_gone_back_is_refused(
    replica: Replica, redis_client: aioredis.Redis
) -> None:
    # GetUser reads the checkpoint in its own pipeline; Redis losing the data must still show.
    projector = replica.service.projector
    reply = await replica.stub.GetUser(pb.GetUserRequest(user_id=replica.user_id), timeout=5)
    assert reply.view_position == projector.checkpoint == 1
    await redis_client.delete(projector.read_checkpoint.key)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await replica.stub.GetUser(pb.GetUserRequest(user_id=replica.user_id), timeout=5)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
