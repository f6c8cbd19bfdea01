"""Users end to end through the real processes: write → outbox → relay → Redis → both replicas."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from opentelemetry.sdk.trace import TracerProvider

from devstack.supervisor import Stack
from tessera.users.v1 import user_command_service_pb2 as cmd
from tessera.users.v1 import user_command_service_pb2_grpc as cmd_grpc
from tessera.users.v1 import user_query_service_pb2 as qry
from tessera.users.v1 import user_query_service_pb2_grpc as qry_grpc
from tessera_client import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, TesseraClient

pytestmark = pytest.mark.e2e

T = TypeVar("T")
PASSWORD = "canary-Pa55word-e2e"


async def eventually(probe: Callable[[], Awaitable[T]], within: float = 15.0) -> T:
    """Retry `probe` until it returns without raising AssertionError/NOT_FOUND, or the deadline passes."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await probe()
        except (AssertionError, grpc.aio.AioRpcError) as error:
            retriable = isinstance(error, AssertionError) or error.code() in (
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.UNAVAILABLE,
            )
            if not retriable or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.02)


def commands(channel: grpc.aio.Channel) -> cmd_grpc.UserCommandServiceAsyncStub:
    return cmd_grpc.UserCommandServiceStub(channel)


def queries(channel: grpc.aio.Channel) -> qry_grpc.UserQueryServiceAsyncStub:
    return qry_grpc.UserQueryServiceStub(channel)


async def register(channel: grpc.aio.Channel, unique: str, **overrides: str) -> cmd.RegisterUserResponse:
    fields = {
        "email": f"Ada.{unique}@Example.com",
        "username": f"ada_{unique}",
        "password": PASSWORD,
        "full_name": "Ada Lovelace",
    }
    fields.update(overrides)
    return await commands(channel).RegisterUser(cmd.RegisterUserRequest(**fields), timeout=10)


async def test_register_becomes_visible_on_both_replicas(
    write_channel: grpc.aio.Channel, read_channels: list[grpc.aio.Channel], unique: str
) -> None:
    reply = await register(write_channel, unique)
    assert reply.version == 1
    for channel in read_channels:
        stub = queries(channel)
        found = await eventually(lambda: stub.GetUser(qry.GetUserRequest(user_id=reply.user_id)))  # noqa: B023
        assert found.user.email == f"Ada.{unique}@Example.com"
        assert found.user.username == f"ada_{unique}"
        assert found.user.active
        assert found.user.version == 1
        by_email = await queries(channel).GetUserByEmail(qry.GetUserByEmailRequest(email=f"ada.{unique}@EXAMPLE.com"))
        assert by_email.user.user_id == reply.user_id


async def test_update_and_deactivate_propagate(
    write_channel: grpc.aio.Channel, read_channels: list[grpc.aio.Channel], unique: str
) -> None:
    user_id = (await register(write_channel, unique)).user_id
    updated = await commands(write_channel).UpdateUserProfile(
        cmd.UpdateUserProfileRequest(
            user_id=user_id, full_name="Ada King", bio="Analyst.\nPoet.", avatar_url="https://example.com/ada.png"
        ),
        timeout=10,
    )
    assert updated.version == 2
    deactivated = await commands(write_channel).DeactivateUser(
        cmd.DeactivateUserRequest(user_id=user_id, reason="left the company"), timeout=10
    )
    assert deactivated.version == 3

    async def deactivated_view(channel: grpc.aio.Channel) -> qry.UserView:
        view = (await queries(channel).GetUser(qry.GetUserRequest(user_id=user_id))).user
        assert view.version == 3
        return view

    for channel in read_channels:
        view = await eventually(lambda: deactivated_view(channel))  # noqa: B023
        assert view.full_name == "Ada King"
        assert view.bio == "Analyst.\nPoet."
        assert view.avatar_url == "https://example.com/ada.png"
        assert not view.active
        assert view.deactivation_reason == "left the company"
        inactive = await queries(channel).ListUsers(
            qry.ListUsersRequest(active=qry.ACTIVE_FILTER_INACTIVE, search=unique, page_size=10)
        )
        assert [u.user_id for u in inactive.users] == [user_id]
        active = await queries(channel).ListUsers(
            qry.ListUsersRequest(active=qry.ACTIVE_FILTER_ACTIVE, search=unique, page_size=10)
        )
        assert active.users == []


async def test_list_users_pages_through_a_replica(
    write_channel: grpc.aio.Channel, read_channels: list[grpc.aio.Channel], unique: str
) -> None:
    ids = []
    for i in range(5):
        reply = await register(write_channel, unique, email=f"p{i}.{unique}@example.com", username=f"p{i}_{unique}")
        ids.append(reply.user_id)
    replica = queries(read_channels[1])

    async def all_pages() -> list[str]:
        seen: list[str] = []
        token = ""
        while True:
            page = await replica.ListUsers(
                qry.ListUsersRequest(
                    page_size=2,
                    page_token=token,
                    search=f"_{unique}",
                    sort_by=qry.USER_SORT_FIELD_USERNAME,
                    sort_direction=qry.SORT_DIRECTION_DESC,
                )
            )
            seen.extend(u.user_id for u in page.users)
            token = page.next_page_token
            if not token:
                break
        assert len(seen) == 5
        return seen

    assert await eventually(all_pages) == list(reversed(ids))


async def test_every_error_case_has_its_status(stack: Stack, unique: str) -> None:
    """Each refusal arrives as the client's typed exception, with its field violations or ErrorInfo."""
    async with TesseraClient(stack.write_address, stack.read_addresses, timeout=10) as tessera:
        users = tessera.users
        user_id = (await users.register_user(_registration(unique))).user_id

        with pytest.raises(InvalidArgument) as bad:
            await users.register_user(email="not-an-email", username="x", password="short", full_name="")
        assert {v.field for v in bad.value.field_violations} == {"email", "username", "password", "full_name"}

        with pytest.raises(AlreadyExists) as taken_email:
            await users.register_user(
                _registration(unique, username=f"other_{unique}", email=f"ADA.{unique}@example.COM")
            )
        assert "email" in taken_email.value.message
        assert taken_email.value.error_info is not None and taken_email.value.error_info.metadata["field"] == "email"
        with pytest.raises(AlreadyExists) as taken_username:
            await users.register_user(
                _registration(unique, email=f"other.{unique}@example.com", username=f"ADA_{unique}")
            )
        assert taken_username.value.error_info is not None
        assert taken_username.value.error_info.metadata["field"] == "username"

        missing = "123e4567-e89b-12d3-a456-426614174000"
        with pytest.raises(NotFound):
            await users.update_user_profile(user_id=missing, full_name="X")
        with pytest.raises(InvalidArgument):
            await users.deactivate_user(user_id="not-a-uuid", reason="x")
        await users.deactivate_user(user_id=user_id, reason="first")
        with pytest.raises(FailedPrecondition):
            await users.deactivate_user(user_id=user_id, reason="second")
        with pytest.raises(FailedPrecondition):
            await users.update_user_profile(user_id=user_id, full_name="Frozen")

        with pytest.raises(NotFound):
            await users.get_user(user_id=missing)
        with pytest.raises(InvalidArgument):
            await users.get_user(user_id="user:*\r\n")
        with pytest.raises(NotFound):
            await users.get_user_by_email(email=f"nobody.{unique}@example.com", consistent=False)
        with pytest.raises(InvalidArgument):
            await users.list_users(page_size=-1, consistent=False)
        with pytest.raises(InvalidArgument):
            await users.list_users(page_token="forged", consistent=False)


def _registration(unique: str, **overrides: str) -> cmd.RegisterUserRequest:
    fields = {
        "email": f"Ada.{unique}@Example.com",
        "username": f"ada_{unique}",
        "password": PASSWORD,
        "full_name": "Ada Lovelace",
    }
    fields.update(overrides)
    return cmd.RegisterUserRequest(**fields)


async def test_password_never_leaves_the_write_model(
    stack: Stack,
    write_channel: grpc.aio.Channel,
    read_channels: list[grpc.aio.Channel],
    redis_server_url: str,
    e2e_prefix: str,
    unique: str,
) -> None:
    secret = f"canary-{unique}-secret"
    user_id = (await register(write_channel, unique, password=secret)).user_id
    await eventually(lambda: queries(read_channels[0]).GetUser(qry.GetUserRequest(user_id=user_id)))

    conn = await asyncpg.connect(stack.database_url)
    try:
        stored = await conn.fetchval("SELECT password_hash FROM users WHERE id = $1::uuid", user_id)
        payloads = await conn.fetch("SELECT payload FROM outbox WHERE aggregate_id = $1", user_id)
        logged = await conn.fetch("SELECT summary::text, error_message FROM command_log")
    finally:
        await conn.close()
    assert stored.startswith("$argon2id$")
    assert secret not in stored
    assert payloads and all(secret.encode() not in bytes(row["payload"]) for row in payloads)
    assert all(secret not in (row["summary"] + row["error_message"]) for row in logged)

    client = aioredis.Redis.from_url(redis_server_url)
    try:
        async for key in client.scan_iter(match=f"{e2e_prefix}*", count=1000):
            raw_kind = await client.type(key)
            kind = raw_kind.decode() if isinstance(raw_kind, bytes) else raw_kind
            if kind == "string":
                assert secret.encode() not in (await client.get(key) or b"")
            elif kind == "hash":
                assert all(secret.encode() not in v for v in (await client.hgetall(key)).values())
    finally:
        await client.aclose()
    for process in stack.processes:
        assert secret not in process.log_path.read_text(encoding="utf-8", errors="replace")


async def test_health_reports_serving_on_every_server(stack: Stack) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for address, service in [
        (stack.write_address, "tessera.users.v1.UserCommandService"),
        *((a, "tessera.users.v1.UserQueryService") for a in stack.read_addresses),
    ]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for name in ("", service):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_the_envelope_carries_the_callers_trace_context(stack: Stack, unique: str) -> None:
    """The client injects the caller's current span; it reaches the event envelope through the write service."""
    tracer = TracerProvider().get_tracer("e2e-caller")
    async with TesseraClient(
        stack.write_address, stack.read_addresses, timeout=10, correlation_id=f"corr-{unique}"
    ) as tessera:
        with tracer.start_as_current_span("caller") as span:
            reply = await tessera.users.register_user(
                email=f"traced.{unique}@example.com", username=f"traced_{unique}", password=PASSWORD, full_name="T"
            )
    trace_id = format(span.get_span_context().trace_id, "032x")
    caller_span = format(span.get_span_context().span_id, "016x")
    conn = await asyncpg.connect(stack.database_url)
    try:
        row = await conn.fetchrow(
            "SELECT traceparent, correlation_id, causation_id FROM outbox WHERE aggregate_id = $1", reply.user_id
        )
        assert row is not None
        logged = await conn.fetchval(
            "SELECT count(*) FROM command_log WHERE command_id::text = $1", row["causation_id"]
        )
    finally:
        await conn.close()
    # Same trace, new span: the write service's server span is a child of the caller's.
    assert row["traceparent"].startswith(f"00-{trace_id}-")
    assert caller_span not in row["traceparent"]
    assert row["correlation_id"] == f"corr-{unique}"
    assert logged == 1
