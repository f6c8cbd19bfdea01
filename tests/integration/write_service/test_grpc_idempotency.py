"""Idempotency keys and expected versions through a real gRPC channel to the real servicer."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest

from shared_kernel.platform.grpc_errors import bad_request_from_status
from shared_kernel.platform.grpc_server import GrpcServer
from tessera.users.v1 import user_command_service_pb2 as pb
from tessera.users.v1 import user_command_service_pb2_grpc as pb_grpc
from tests.integration.write_service.support import PRINCIPAL_HEADER, PrincipalFromHeader
from tests.integration.write_service.tables import rows
from tests.unit.write_service import helpers
from write_service import bootstrap
from write_service.entrypoints.users import USER_SERVICE_NAME
from write_service.settings import WriteServiceSettings

pytestmark = pytest.mark.integration

REGISTER = f"/{USER_SERVICE_NAME}/RegisterUser"


@pytest.fixture
async def channel(db_pool: asyncpg.Pool[Any]) -> AsyncIterator[grpc.aio.Channel]:
    settings = WriteServiceSettings(
        grpc_host="127.0.0.1",
        grpc_port=0,
        grpc_shutdown_grace_s=1.0,
        command_timeout_s=5.0,
        argon2_time_cost=1,
        argon2_memory_cost_kib=8,
        argon2_parallelism=1,
    )
    service = bootstrap.build(db_pool, settings)
    server = GrpcServer(settings, [USER_SERVICE_NAME], interceptors=[PrincipalFromHeader()])
    server.add(pb_grpc.add_UserCommandServiceServicer_to_server, service.servicer)
    port = await server.start()
    await server.set_serving(True)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
        yield chan
    await server.stop()


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.UserCommandServiceAsyncStub:
    return pb_grpc.UserCommandServiceStub(channel)


def keyed(key: str, principal: str = "checkout") -> tuple[tuple[str, str], ...]:
    return (("idempotency-key", key), (PRINCIPAL_HEADER, principal))


def register_request() -> pb.RegisterUserRequest:
    token = helpers.suffix()
    return pb.RegisterUserRequest(
        email=f"g{token}@example.com", username=f"g{token}", password=helpers.PASSWORD, full_name="Grace Hopper"
    )


async def test_a_retry_gets_the_identical_reply_bytes_and_one_effect(channel, db_pool):
    # No deserializer: the test sees the reply exactly as it crossed the wire.
    register = channel.unary_unary(REGISTER, request_serializer=pb.RegisterUserRequest.SerializeToString)
    request = register_request()
    key = helpers.key()
    first: bytes = await register(request, metadata=keyed(key), timeout=10)
    again: bytes = await register(request, metadata=keyed(key), timeout=10)
    assert again == first
    reply = pb.RegisterUserResponse.FromString(first)
    assert reply.version == 1
    assert len(await rows(db_pool, "users")) == 1
    assert len(await rows(db_pool, "outbox")) == 1
    log = await rows(db_pool, "command_log")
    assert [(e["outcome"], e["principal"], e["idempotency_key"]) for e in log] == [
        ("succeeded", "checkout", key),
        ("replayed", "checkout", key),
    ]
    assert log[1]["replay_of"] == log[0]["command_id"]


async def test_another_principal_with_the_same_key_is_a_new_request(stub, db_pool):
    registered = await stub.RegisterUser(register_request(), timeout=10)
    update = pb.UpdateUserProfileRequest(user_id=registered.user_id, full_name="Amazing Grace")
    key = helpers.key()
    first = await stub.UpdateUserProfile(update, metadata=keyed(key, "svc-a"), timeout=10)
    second = await stub.UpdateUserProfile(update, metadata=keyed(key, "svc-b"), timeout=10)
    assert (first.version, second.version) == (2, 3)


# A client's gRPC library already refuses control characters in a header value; the server
# checks them anyway (unit tests), for callers that do not go through such a library.
@pytest.mark.parametrize("key", ["k" * 256, ""])
async def test_a_malformed_key_is_invalid_argument_naming_the_header(stub, key):
    with pytest.raises(grpc.aio.AioRpcError) as exc_info:
        await stub.RegisterUser(register_request(), metadata=(("idempotency-key", key),), timeout=10)
    assert exc_info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad_request = bad_request_from_status(exc_info.value)
    assert bad_request is not None
    [violation] = bad_request.field_violations
    assert violation.field == "idempotency-key"
    assert "1 to 255 printable ASCII" in violation.description


async def test_the_same_key_with_another_request_is_invalid_argument(stub, db_pool):
    key = helpers.key()
    await stub.RegisterUser(register_request(), metadata=keyed(key), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as exc_info:
        await stub.RegisterUser(register_request(), metadata=keyed(key), timeout=10)
    error = exc_info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "the idempotency key was already used for a different request"
    bad_request = bad_request_from_status(error)
    assert bad_request is not None
    assert [v.field for v in bad_request.field_violations] == ["idempotency-key"]
    assert len(await rows(db_pool, "users")) == 1


async def test_concurrent_calls_with_one_key_have_one_effect(stub, db_pool):
    registered = await stub.RegisterUser(register_request(), timeout=10)
    update = pb.UpdateUserProfileRequest(user_id=registered.user_id, full_name="Concurrent")
    key = helpers.key()
    outcomes = await asyncio.gather(
        *(stub.UpdateUserProfile(update, metadata=keyed(key), timeout=10) for _ in range(6)), return_exceptions=True
    )
    replies = [o for o in outcomes if isinstance(o, pb.UpdateUserProfileResponse)]
    failures = [o for o in outcomes if not isinstance(o, pb.UpdateUserProfileResponse)]
    assert replies
    assert {(r.user_id, r.version) for r in replies} == {(registered.user_id, 2)}
    assert all(isinstance(f, grpc.aio.AioRpcError) and f.code() == grpc.StatusCode.ABORTED for f in failures)
    [user] = await rows(db_pool, "users")
    assert user["version"] == 2
    assert len(await rows(db_pool, "outbox")) == 2


async def test_expected_version_match_and_mismatch(stub, db_pool):
    registered = await stub.RegisterUser(register_request(), timeout=10)
    updated = await stub.UpdateUserProfile(
        pb.UpdateUserProfileRequest(user_id=registered.user_id, full_name="V2", expected_version=1), timeout=10
    )
    assert updated.version == 2
    for call in (
        stub.UpdateUserProfile(
            pb.UpdateUserProfileRequest(user_id=registered.user_id, full_name="V3", expected_version=1), timeout=10
        ),
        stub.DeactivateUser(
            pb.DeactivateUserRequest(user_id=registered.user_id, reason="stale", expected_version=1), timeout=10
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as exc_info:
            await call
        assert exc_info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert exc_info.value.details() == (f"user {registered.user_id} is at version 2, not the expected version 1")
    deactivated = await stub.DeactivateUser(
        pb.DeactivateUserRequest(user_id=registered.user_id, reason="done", expected_version=2), timeout=10
    )
    assert deactivated.version == 3
    with pytest.raises(grpc.aio.AioRpcError) as exc_info:
        await stub.DeactivateUser(
            pb.DeactivateUserRequest(user_id=str(uuid.uuid4()), reason="x", expected_version=0), timeout=10
        )
    assert exc_info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad_request = bad_request_from_status(exc_info.value)
    assert bad_request is not None
    assert [v.field for v in bad_request.field_violations] == ["expected_version"]


async def test_a_keyed_retry_of_a_versioned_update_is_not_refused(stub, db_pool):
    registered = await stub.RegisterUser(register_request(), timeout=10)
    request = pb.UpdateUserProfileRequest(user_id=registered.user_id, full_name="Once", expected_version=1)
    key = helpers.key()
    first = await stub.UpdateUserProfile(request, metadata=keyed(key), timeout=10)
    # The reply was lost, say; the retry carries the now stale version 1 and still succeeds.
    again = await stub.UpdateUserProfile(request, metadata=keyed(key), timeout=10)
    assert again == first
    assert first.version == 2
