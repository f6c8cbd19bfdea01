"""The real servicer behind the real GrpcServer on port 0, called through a channel and the stub."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared_kernel.platform.grpc_errors import bad_request_from_status
from shared_kernel.platform.grpc_server import GrpcServer
from tessera.users.v1 import user_command_service_pb2 as pb
from tessera.users.v1 import user_command_service_pb2_grpc as pb_grpc
from tests.integration.write_service.tables import everything_as_text, rows
from tests.unit.write_service import helpers
from write_service import bootstrap
from write_service.entrypoints.users import USER_SERVICE_NAME
from write_service.settings import WriteServiceSettings

pytestmark = pytest.mark.integration

PASSWORD = "Zebra-Quokka-73!unique"


@pytest.fixture
async def channel(db_pool: asyncpg.Pool[Any]) -> AsyncIterator[grpc.aio.Channel]:
    settings = WriteServiceSettings(
        grpc_host="127.0.0.1",
        grpc_port=0,
        grpc_shutdown_grace_s=1.0,
        command_timeout_s=1.0,
        argon2_time_cost=1,
        argon2_memory_cost_kib=8,
        argon2_parallelism=1,
    )
    service = bootstrap.build(db_pool, settings)
    server = GrpcServer(settings, [USER_SERVICE_NAME])
    server.add(pb_grpc.add_UserCommandServiceServicer_to_server, service.servicer)
    port = await server.start()
    await server.set_serving(True)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
        yield chan
    await server.stop()


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.UserCommandServiceAsyncStub:
    return pb_grpc.UserCommandServiceStub(channel)


def register_request(**overrides: str) -> pb.RegisterUserRequest:
    token = helpers.suffix()
    fields = {
        "email": f"u{token}@example.com",
        "username": f"u{token}",
        "password": PASSWORD,
        "full_name": "Katherine Johnson",
    }
    fields.update(overrides)
    return pb.RegisterUserRequest(**fields)


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return info
    return None


async def test_health_reports_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=USER_SERVICE_NAME), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_watch_streams_through_the_error_mapping_interceptor(channel):
    # Watch writes with context.write() instead of yielding; the interceptor must pass that through,
    # or clients that health-check with a service config (round_robin) see INTERNAL.
    health = health_pb2_grpc.HealthStub(channel)
    call = health.Watch(health_pb2.HealthCheckRequest(service=USER_SERVICE_NAME), timeout=5)
    first = await call.read()
    call.cancel()
    assert first.status == health_pb2.HealthCheckResponse.SERVING


async def test_commands_reply_with_the_id_and_new_version(stub):
    registered = await stub.RegisterUser(register_request(), timeout=10)
    assert str(uuid.UUID(registered.user_id)) == registered.user_id
    assert registered.version == 1
    updated = await stub.UpdateUserProfile(
        pb.UpdateUserProfileRequest(
            user_id=registered.user_id, full_name="K. Johnson", bio="NASA\nLangley", avatar_url="https://e.com/k.png"
        ),
        timeout=10,
    )
    assert (updated.user_id, updated.version) == (registered.user_id, 2)
    deactivated = await stub.DeactivateUser(
        pb.DeactivateUserRequest(user_id=registered.user_id, reason="retired"), timeout=10
    )
    assert (deactivated.user_id, deactivated.version) == (registered.user_id, 3)


async def test_invalid_input_lists_every_field(stub):
    with pytest.raises(grpc.aio.AioRpcError) as exc_info:
        await stub.RegisterUser(
            pb.RegisterUserRequest(email="not-an-email", username="-x", password="short", full_name=""), timeout=10
        )
    error = exc_info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad_request = bad_request_from_status(error)
    assert bad_request is not None
    fields = {v.field: v.description for v in bad_request.field_violations}
    assert set(fields) == {"email", "username", "password", "full_name"}
    assert "8 to 128" in fields["password"]
    assert "short" not in str(error.details())


@pytest.mark.parametrize(
    ("method", "request_message", "field"),
    [
        ("UpdateUserProfile", pb.UpdateUserProfileRequest(user_id="nope", full_name="x"), "user_id"),
        (
            "UpdateUserProfile",
            pb.UpdateUserProfileRequest(user_id=str(uuid.uuid4()), full_name="x", avatar_url="ftp://x"),
            "avatar_url",
        ),
        ("DeactivateUser", pb.DeactivateUserRequest(user_id=str(uuid.uuid4()), reason=""), "reason"),
    ],
)
async def test_invalid_input_names_the_proto_field(stub, method, request_message, field):
    with pytest.raises(grpc.aio.AioRpcError) as exc_info:
        await getattr(stub, method)(request_message, timeout=10)
    assert exc_info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad_request = bad_request_from_status(exc_info.value)
    assert bad_request is not None
    assert [v.field for v in bad_request.field_violations] == [field]


async def test_a_malformed_correlation_header_is_invalid(stub):
    with pytest.raises(grpc.aio.AioRpcError) as exc_info:
        await stub.RegisterUser(register_request(), metadata=(("x-correlation-id", "x" * 129),), timeout=10)
    bad_request = bad_request_from_status(exc_info.value)
    assert bad_request is not None
    assert [v.field for v in bad_request.field_violations] == ["x-correlation-id"]


@pytest.mark.parametrize("field", ["email", "username"])
async def test_a_duplicate_is_already_exists_naming_the_field(stub, field):
    first = register_request()
    await stub.RegisterUser(first, timeout=10)
    twin = register_request(**{field: getattr(first, field).upper()})
    with pytest.raises(grpc.aio.AioRpcError) as exc_info:
        await stub.RegisterUser(twin, timeout=10)
    error = exc_info.value
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert field in (error.details() or "")
    info = error_info(error)
    assert info is not None
    assert info.metadata["field"] == field


async def test_unknown_user_is_not_found(stub):
    for call in (
        stub.UpdateUserProfile(pb.UpdateUserProfileRequest(user_id=str(uuid.uuid4()), full_name="x"), timeout=10),
        stub.DeactivateUser(pb.DeactivateUserRequest(user_id=str(uuid.uuid4()), reason="x"), timeout=10),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as exc_info:
            await call
        assert exc_info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_broken_rules_are_failed_precondition(stub):
    registered = await stub.RegisterUser(register_request(), timeout=10)
    await stub.DeactivateUser(pb.DeactivateUserRequest(user_id=registered.user_id, reason="spam"), timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as exc_info:
        await stub.DeactivateUser(pb.DeactivateUserRequest(user_id=registered.user_id, reason="again"), timeout=10)
    assert exc_info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert exc_info.value.details() == "user is already deactivated"
    with pytest.raises(grpc.aio.AioRpcError) as exc_info:
        await stub.UpdateUserProfile(pb.UpdateUserProfileRequest(user_id=registered.user_id, full_name="x"), timeout=10)
    assert exc_info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_the_password_is_stored_only_as_an_argon2id_hash(stub, db_pool):
    registered = await stub.RegisterUser(register_request(), timeout=10)
    await stub.UpdateUserProfile(pb.UpdateUserProfileRequest(user_id=registered.user_id, full_name="K"), timeout=10)
    # A rejected command is logged too; its row must not hold the password either.
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.RegisterUser(
            register_request(username=f"other{helpers.suffix()}", email="dup@example.com"), timeout=10
        )
        await stub.RegisterUser(register_request(email="DUP@example.com"), timeout=10)
    [user] = [u for u in await rows(db_pool, "users") if str(u["id"]) == registered.user_id]
    assert user["password_hash"].startswith("$argon2id$v=19$")
    everything = await everything_as_text(db_pool)
    assert PASSWORD not in everything
    assert user["password_hash"] not in "\n".join(str(r) for r in await rows(db_pool, "outbox"))
    log = await rows(db_pool, "command_log")
    assert {e["outcome"] for e in log} == {"succeeded", "rejected"}
    assert all("password" not in e["summary"] for e in log)


async def test_correlation_and_trace_context_reach_the_outbox(stub, db_pool):
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    metadata = (
        ("x-correlation-id", "checkout-42"),
        ("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),
    )
    registered = await stub.RegisterUser(register_request(), metadata=metadata, timeout=10)
    [event] = [e for e in await rows(db_pool, "outbox") if e["aggregate_id"] == registered.user_id]
    assert event["correlation_id"] == "checkout-42"
    assert event["traceparent"].startswith(f"00-{trace_id}-")
    [entry] = [e for e in await rows(db_pool, "command_log") if e["aggregate_id"] == registered.user_id]
    assert entry["correlation_id"] == "checkout-42"
    assert event["causation_id"] == str(entry["command_id"])


async def test_the_server_caps_a_command_that_waits_on_a_lock(stub, db_pool):
    registered = await stub.RegisterUser(register_request(), timeout=10)
    holder = await db_pool.acquire()
    try:
        tx = holder.transaction()
        await tx.start()
        try:
            await holder.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", uuid.UUID(registered.user_id))
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as exc_info:
                # The caller allows 30 s; the server's cap (1 s in this fixture) ends it first.
                await stub.UpdateUserProfile(
                    pb.UpdateUserProfileRequest(user_id=registered.user_id, full_name="x"), timeout=30
                )
            assert exc_info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < 5
        finally:
            await tx.rollback()
    finally:
        await db_pool.release(holder)


async def test_a_short_caller_deadline_ends_the_work_on_the_server(stub, db_pool):
    registered = await stub.RegisterUser(register_request(), timeout=10)
    holder = await db_pool.acquire()
    try:
        tx = holder.transaction()
        await tx.start()
        try:
            await holder.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", uuid.UUID(registered.user_id))
            with pytest.raises(grpc.aio.AioRpcError) as exc_info:
                await stub.UpdateUserProfile(
                    pb.UpdateUserProfileRequest(user_id=registered.user_id, full_name="x"), timeout=0.3
                )
            # The server gives up at the caller's deadline too, so either answer may arrive first.
            assert exc_info.value.code() in {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE}
            await wait_until_no_lock_waits(db_pool)
        finally:
            await tx.rollback()
    finally:
        await db_pool.release(holder)
    updated = await stub.UpdateUserProfile(
        pb.UpdateUserProfileRequest(user_id=registered.user_id, full_name="after"), timeout=10
    )
    assert updated.version == 2


async def wait_until_no_lock_waits(pool: asyncpg.Pool[Any], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        waiting = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        if not waiting:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the server kept waiting on the lock after the caller's deadline")
