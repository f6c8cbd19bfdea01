"""What the client puts on the wire, against an in-process gRPC server that records every call:
one idempotency key reused on every retry of a command, none retried without one, the bearer
token from each provider (a rotated token file is re-read), the caller's trace context, mutual
TLS, and the health-checked round_robin read channel skipping a NOT_SERVING replica."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from tessera.users.v1 import user_command_service_pb2 as cmd
from tessera.users.v1 import user_query_service_pb2 as q
from tessera_client import CallableToken, ChannelOptions, FileToken, TesseraClient, Tls, Unavailable
from tessera_client.channels import read_service_config, read_target
from tests.integration.shared_kernel.platform.security.certs import Authority


@dataclass
class Recorder:
    """A fake replica and write service in one: answers RegisterUser and GetUser, records metadata."""

    name: str = "replica"
    fail_first: int = 0
    calls: list[dict[str, str]] = field(default_factory=list)

    def handlers(self) -> grpc.GenericRpcHandler:
        async def register(request: cmd.RegisterUserRequest, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            self.calls.append(dict(context.invocation_metadata() or ()))  # type: ignore[arg-type]
            if len(self.calls) <= self.fail_first:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
            return cmd.RegisterUserResponse(user_id="u-1", version=1, consistency_token="tok-u-1")

        async def get_user(request: q.GetUserRequest, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            self.calls.append(dict(context.invocation_metadata() or ()) | {"token": request.consistency_token})  # type: ignore[arg-type]
            return q.GetUserResponse(user=q.UserView(user_id=request.user_id, full_name=self.name, version=1))

        return grpc.method_handlers_generic_handler(
            "tessera.users.v1.UserCommandService",
            {
                "RegisterUser": grpc.unary_unary_rpc_method_handler(
                    register,
                    request_deserializer=cmd.RegisterUserRequest.FromString,
                    response_serializer=cmd.RegisterUserResponse.SerializeToString,
                )
            },
        ), grpc.method_handlers_generic_handler(
            "tessera.users.v1.UserQueryService",
            {
                "GetUser": grpc.unary_unary_rpc_method_handler(
                    get_user,
                    request_deserializer=q.GetUserRequest.FromString,
                    response_serializer=q.GetUserResponse.SerializeToString,
                )
            },
        )  # type: ignore[return-value]


Serve = Callable[..., Awaitable[tuple[str, health_aio.HealthServicer]]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[grpc.aio.Server] = []

    async def start(recorder: Recorder, credentials: grpc.ServerCredentials | None = None) -> Any:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(recorder.handlers())  # type: ignore[arg-type]
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        address = "127.0.0.1:0"
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        await server.start()
        servers.append(server)
        return f"127.0.0.1:{port}", health

    yield start
    for server in servers:
        await server.stop(0)


async def test_a_command_keeps_one_idempotency_key_across_retries(serve: Serve) -> None:
    recorder = Recorder(fail_first=2)
    address, _ = await serve(recorder)
    async with TesseraClient(address, [address], timeout=10) as client:
        reply = await client.users.register_user(email="a@example.com", username="a", password="p" * 12)
        assert reply.user_id == "u-1"
    keys = [call["idempotency-key"] for call in recorder.calls]
    assert len(keys) == 3 and len(set(keys)) == 1 and keys[0]


async def test_without_a_key_a_command_is_never_retried(serve: Serve) -> None:
    recorder = Recorder(fail_first=1)
    address, _ = await serve(recorder)
    async with TesseraClient(address, [address], timeout=10) as client:
        with pytest.raises(Unavailable):
            await client.users.register_user(email="a@example.com", username="a", idempotency_key=False)
    assert len(recorder.calls) == 1 and "idempotency-key" not in recorder.calls[0]


async def test_tokens_and_trace_context_travel_on_every_call(serve: Serve, tmp_path: Path) -> None:
    recorder = Recorder()
    address, _ = await serve(recorder)
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")
    tracer = TracerProvider().get_tracer("client-test")
    async with TesseraClient(address, [address], token=FileToken(token_file)) as client:
        with tracer.start_as_current_span("caller") as span:
            await client.users.register_user(email="a@example.com", username="a")
            trace_id = format(span.get_span_context().trace_id, "032x")
        token_file.write_text("second-token-longer\n")  # rotated by a sidecar
        await client.users.get_user(user_id="u-1")
    first, second = recorder.calls
    assert first["authorization"] == "Bearer first-token"
    assert trace_id in first["traceparent"]
    assert second["authorization"] == "Bearer second-token-longer"
    assert second["token"] == "tok-u-1", "the session sent the write's consistency token"

    async def fetch() -> str:
        return "from-a-coroutine"

    async with TesseraClient(address, [address], token=CallableToken(fetch)) as client:
        await client.users.get_user(user_id="u-1", consistent=False)
    assert recorder.calls[-1]["authorization"] == "Bearer from-a-coroutine"
    assert recorder.calls[-1]["token"] == ""
    assert trace.get_current_span() is trace.INVALID_SPAN


async def test_mutual_tls(serve: Serve, tmp_path: Path) -> None:
    ca = Authority(tmp_path, "client-test")
    server_cert, client_cert = ca.issue("server", server=True), ca.issue("svc-orders", server=False)
    credentials = grpc.ssl_server_credentials(
        [(server_cert.key.read_bytes(), server_cert.cert.read_bytes())],
        root_certificates=ca.cert.read_bytes(),
        require_client_auth=True,
    )
    address, _ = await serve(Recorder(), credentials)
    ca_file = ca.cert
    mutual = ChannelOptions(tls=Tls(ca_file=ca_file, cert_file=client_cert.cert, key_file=client_cert.key))
    async with TesseraClient(address, [address], options=mutual) as client:
        assert (await client.users.get_user(user_id="u-1")).user.user_id == "u-1"
    one_way = ChannelOptions(tls=Tls(ca_file=ca_file))
    async with TesseraClient(address, [address], options=one_way, timeout=2) as client:
        with pytest.raises(Unavailable):
            await client.users.get_user(user_id="u-1")


async def test_the_read_channel_skips_a_not_serving_replica(serve: Serve) -> None:
    first, second = Recorder(name="first"), Recorder(name="second")
    first_address, first_health = await serve(first)
    second_address, _ = await serve(second)
    async with TesseraClient(first_address, [first_address, second_address]) as client:
        names = {(await client.users.get_user(user_id="u")).user.full_name for _ in range(10)}
        assert names == {"first", "second"}, "round_robin over both"
        await first_health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        deadline = asyncio.get_running_loop().time() + 10
        while True:  # the health watch reaches the client asynchronously
            picked = [(await client.users.get_user(user_id="u")).user.full_name for _ in range(10)]
            if set(picked) == {"second"}:
                break
            assert asyncio.get_running_loop().time() < deadline, picked


def test_read_targets_and_service_config() -> None:
    assert read_target(["10.0.0.1:50052", "10.0.0.2:50052"]) == "ipv4:10.0.0.1:50052,10.0.0.2:50052"
    assert read_target("reads.internal:50052") == "dns:///reads.internal:50052"
    assert read_target("dns:///reads.internal:50052") == "dns:///reads.internal:50052"
    with pytest.raises(ValueError, match="IP literals"):
        read_target(["a.internal:1", "b.internal:1"])
    config = read_service_config(ChannelOptions())
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": ""}
    policy = config["methodConfig"][0]["retryPolicy"]
    assert set(policy["retryableStatusCodes"]) == {"UNAVAILABLE", "DEADLINE_EXCEEDED"}


async def test_a_watch_without_any_replica_gives_up_after_its_budget() -> None:
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    async with TesseraClient(address, [address]) as client:
        started = asyncio.get_running_loop().time()
        with pytest.raises(Unavailable):
            async for _ in client.users.watch_user(user_id="u", reconnect_within_s=1.0):
                pass
        assert asyncio.get_running_loop().time() - started < 10
