"""Authentication and authorization through the real processes (StackConfig(auth=True)), and grpcurl with a token."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest

from devstack.supervisor import ServiceProcess, Stack
from shared_kernel.platform.healthcheck import check_serving
from tessera.users.v1 import user_command_service_pb2 as cmd
from tessera.users.v1 import user_command_service_pb2_grpc as cmd_grpc
from tessera.users.v1 import user_query_service_pb2 as qry
from tessera.users.v1 import user_query_service_pb2_grpc as qry_grpc
from tests.e2e.grpcurl import grpcurl

pytestmark = pytest.mark.e2e

READ = ["users:read"]
WRITE = ["users:write"]


@pytest.fixture(scope="module")
async def channels(auth_stack: Stack) -> AsyncIterator[tuple[grpc.aio.Channel, list[grpc.aio.Channel]]]:
    """A channel to the write service and one to each replica."""
    write = grpc.aio.insecure_channel(auth_stack.write_address)
    reads = [grpc.aio.insecure_channel(address) for address in auth_stack.read_addresses]
    try:
        yield write, reads
    finally:
        for channel in [write, *reads]:
            await channel.close()


def registration(unique: str) -> cmd.RegisterUserRequest:
    return cmd.RegisterUserRequest(
        email=f"sec.{unique}@example.com",
        username=f"sec_{unique}",
        password="correct horse battery staple",
        full_name="Secure Caller",
    )


async def refusal(call: asyncio.Future[object] | object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


async def test_commands_need_a_token_with_the_write_scope(auth_stack: Stack, channels, unique: str) -> None:
    write, _ = channels
    stub = cmd_grpc.UserCommandServiceStub(write)

    error = await refusal(stub.RegisterUser(registration(unique), timeout=10))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer" in (error.details() or "")

    error = await refusal(stub.RegisterUser(registration(unique), metadata=auth_stack.auth_metadata(READ), timeout=10))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "users:write" in (error.details() or "")

    forged = auth_stack.auth_metadata(WRITE)[0][1][:-4] + "AAAA"
    error = await refusal(stub.RegisterUser(registration(unique), metadata=[("authorization", forged)], timeout=10))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED

    reply = await stub.RegisterUser(registration(unique), metadata=auth_stack.auth_metadata(WRITE), timeout=10)
    assert reply.version == 1


async def test_queries_need_a_token_with_the_read_scope(auth_stack: Stack, channels, unique: str) -> None:
    write, reads = channels
    registered = await cmd_grpc.UserCommandServiceStub(write).RegisterUser(
        registration(unique), metadata=auth_stack.auth_metadata(WRITE), timeout=10
    )
    for channel in reads:
        stub = qry_grpc.UserQueryServiceStub(channel)
        request = qry.GetUserRequest(user_id=registered.user_id)
        error = await refusal(stub.GetUser(request, timeout=10))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        error = await refusal(stub.GetUser(request, metadata=auth_stack.auth_metadata(WRITE), timeout=10))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "users:read" in (error.details() or "")

        deadline = time.monotonic() + 15
        while True:
            try:
                found = await stub.GetUser(request, metadata=auth_stack.auth_metadata(READ), timeout=10)
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.02)
        assert found.user.username == f"sec_{unique}"


def test_health_needs_no_token(auth_stack: Stack) -> None:
    for address in [auth_stack.write_address, *auth_stack.read_addresses]:
        assert check_serving(address, timeout=5)


def test_grpcurl_with_an_authorization_header(auth_stack: Stack, unique: str) -> None:
    listed = grpcurl(auth_stack.write_address, "list")  # reflection needs no token
    assert listed.returncode == 0, listed.stderr
    assert "tessera.users.v1.UserCommandService" in listed.stdout

    request = json.dumps(
        {
            "email": f"curl.{unique}@example.com",
            "username": f"curl_{unique}",
            "password": "pw-0123456789",
            "full_name": "C",
        }
    )
    method = "tessera.users.v1.UserCommandService/RegisterUser"
    refused = grpcurl("-d", request, auth_stack.write_address, method)
    assert refused.returncode != 0
    assert "Unauthenticated" in refused.stderr

    token = auth_stack.mint_token(WRITE, sub="grpcurl-user")
    accepted = grpcurl("-H", f"authorization: Bearer {token}", "-d", request, auth_stack.write_address, method)
    assert accepted.returncode == 0, accepted.stderr
    assert json.loads(accepted.stdout)["version"] == "1"


@pytest.mark.parametrize("module", ["write_service", "read_service"])
def test_a_service_without_a_signing_key_refuses_to_start(module: str, tmp_path: Path) -> None:
    process = ServiceProcess.python_module(
        module,
        module,
        env={"AUTH_MODE": "required", "AUTH_SIGNING_KEY": "", "LOG_FORMAT": "text"},
        grpc_port=0,
        log_path=tmp_path / f"{module}.log",
    ).start()
    assert process.wait(30) == 1
    log = process.log_path.read_text()
    assert "refused to start" in log
    assert "AUTH_SIGNING_KEY is not set" in log
    assert "Traceback" not in log


async def test_the_audit_trail_names_the_tokens_subject(auth_stack: Stack, channels, unique: str) -> None:
    write, _ = channels
    stub = cmd_grpc.UserCommandServiceStub(write)
    as_alice = auth_stack.auth_metadata(WRITE, sub=f"alice-{unique}")
    reply = await stub.RegisterUser(
        registration(f"audit{unique}"), metadata=[*as_alice, ("idempotency-key", f"audit-{unique}")], timeout=10
    )
    again = await stub.RegisterUser(
        registration(f"audit{unique}"), metadata=[*as_alice, ("idempotency-key", f"audit-{unique}")], timeout=10
    )
    assert again == reply
    conn = await asyncpg.connect(auth_stack.database_url)
    try:
        rows = await conn.fetch(
            "SELECT principal, outcome, idempotency_key FROM command_log WHERE aggregate_id = $1 ORDER BY received_at",
            reply.user_id,
        )
        events = await conn.fetchval("SELECT count(*) FROM outbox WHERE aggregate_id = $1", reply.user_id)
    finally:
        await conn.close()
    assert [(r["principal"], r["outcome"], r["idempotency_key"]) for r in rows] == [
        (f"alice-{unique}", "succeeded", f"audit-{unique}"),
        (f"alice-{unique}", "replayed", f"audit-{unique}"),
    ]
    assert events == 1
