"""The auth interceptor on a real GrpcServer, called through real channels."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from shared_kernel.platform.security.authn import (
    ANONYMOUS,
    INSECURE_PRINCIPAL,
    BearerTokenAuthenticator,
    InsecureAuthenticator,
    current_principal,
)
from shared_kernel.platform.security.tokens import TokenSigner, TokenVerifier

from .conftest import ADMIN, COMMANDS, QUERIES, ServeFactory, unary

pytestmark = pytest.mark.integration

KEY = b"integration-signing-key-0123456789abcdef"


def bearer(scopes: list[str], sub: str = "alice", ttl_s: int = 60, key: bytes = KEY, now: float | None = None):
    clock = (lambda: now) if now is not None else None
    signer = TokenSigner(key, clock=clock) if clock is not None else TokenSigner(key)
    return [("authorization", f"Bearer {signer.mint(sub, scopes, ttl_s)}")]


def authenticator() -> BearerTokenAuthenticator:
    return BearerTokenAuthenticator(TokenVerifier([KEY], leeway_s=0))


async def call(port: int, service: str, method: str, metadata=None) -> bytes:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply: bytes = await unary(channel, f"/{service}/{method}")(b"", metadata=metadata, timeout=5)
        return reply


async def failure(port: int, service: str, method: str, metadata=None) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(port, service, method, metadata)
    return caught.value


def trailer(error: grpc.aio.AioRpcError, name: str) -> str:
    return next(str(value) for key, value in error.trailing_metadata() or () if key == name)


async def test_no_token_is_unauthenticated_with_a_challenge(serve: ServeFactory):
    async with serve(authenticator()) as server:
        error = await failure(server.port, COMMANDS, "RegisterUser")
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (error.details() or "") == 'missing bearer token (WWW-Authenticate: Bearer realm="tessera")'
    assert trailer(error, "www-authenticate") == 'Bearer realm="tessera"'


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        (bearer(["users:write"], ttl_s=60, now=1_000_000), "token expired"),
        (bearer(["users:write"], key=b"another-key-another-key-another-key!"), "bad signature"),
        ([("authorization", "Bearer nonsense")], "malformed token"),
        ([("authorization", "Basic YWxhZGRpbjpvcGVuc2VzYW1l")], 'authorization must be "Bearer <token>"'),
    ],
)
async def test_bad_tokens_are_unauthenticated(serve: ServeFactory, metadata, reason):
    async with serve(authenticator()) as server:
        error = await failure(server.port, COMMANDS, "RegisterUser", metadata)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (error.details() or "").startswith(reason)
    assert "error=" in trailer(error, "www-authenticate")
    token = metadata[0][1].partition(" ")[2]
    assert token not in (error.details() or "")


async def test_a_tampered_token_is_unauthenticated(serve: ServeFactory):
    token = bearer(["users:read"])[0][1]
    header, payload, signature = token.removeprefix("Bearer ").split(".")
    other_payload = bearer(["admin"])[0][1].split(".")[1]
    async with serve(authenticator()) as server:
        error = await failure(
            server.port, COMMANDS, "RegisterUser", [("authorization", f"Bearer {header}.{other_payload}.{signature}")]
        )
    assert (error.code(), (error.details() or "").split(" (")[0]) == (grpc.StatusCode.UNAUTHENTICATED, "bad signature")
    assert payload != other_payload


async def test_a_missing_scope_is_permission_denied_naming_the_scope(serve: ServeFactory):
    async with serve(authenticator()) as server:
        error = await failure(server.port, COMMANDS, "RegisterUser", bearer(["users:read"]))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert '"users:write"' in (error.details() or "")
        assert 'error="insufficient_scope", scope="users:write"' in trailer(error, "www-authenticate")

        error = await failure(server.port, QUERIES, "GetUser", bearer(["users:write"]))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert '"users:read"' in (error.details() or "")

        error = await failure(server.port, ADMIN, "Rebuild", bearer(["users:read", "users:write"]))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert '"admin"' in (error.details() or "")


async def test_the_right_scope_passes_and_the_handler_sees_the_principal(serve: ServeFactory):
    async with serve(authenticator()) as server:
        assert await call(server.port, COMMANDS, "RegisterUser", bearer(["users:write"], sub="writer")) == b"writer"
        assert await call(server.port, QUERIES, "GetUser", bearer(["users:read"], sub="reader")) == b"reader"
        for service, method in [(COMMANDS, "RegisterUser"), (QUERIES, "GetUser"), (ADMIN, "Rebuild")]:
            assert await call(server.port, service, method, bearer(["admin"], sub="operator")) == b"operator"
    assert current_principal() == ANONYMOUS  # nothing leaked into the caller's (same-loop) context


async def test_streaming_calls_are_checked_and_see_the_principal(serve: ServeFactory):
    async with serve(authenticator()) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        watch: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(f"/{QUERIES}/WatchUsers")
        replies = [reply async for reply in watch(b"", metadata=bearer(["users:read"], sub="watcher"), timeout=5)]
        assert replies == [b"watcher"] * 3

        for metadata, code in [
            (None, grpc.StatusCode.UNAUTHENTICATED),
            (bearer([]), grpc.StatusCode.PERMISSION_DENIED),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                _ = [reply async for reply in watch(b"", metadata=metadata, timeout=5)]
            assert caught.value.code() == code


async def test_health_is_open_without_a_token(serve: ServeFactory):
    async with serve(authenticator()) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=COMMANDS), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def _list_services(port: int) -> list[str]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        # Write, half-close, then read: with a request iterator, the library's sending task
        # can still be writing when the channel closes, which fails as an internal error.
        call = stub.ServerReflectionInfo(timeout=5)
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        await call.done_writing()
        reply = await call.read()
        if reply is grpc.aio.EOF:
            raise AssertionError("no reflection reply")
        return sorted(service.name for service in reply.list_services_response.service)


async def test_reflection_is_open_when_enabled_and_absent_when_disabled(serve: ServeFactory):
    async with serve(authenticator(), grpc_reflection=True) as server:
        assert set(await _list_services(server.port)) >= {COMMANDS, QUERIES, "grpc.health.v1.Health"}
    async with serve(authenticator(), grpc_reflection=False) as server:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _list_services(server.port)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_insecure_mode_lets_everyone_in_as_the_dev_principal(serve: ServeFactory):
    async with serve(InsecureAuthenticator()) as server:
        assert await call(server.port, COMMANDS, "RegisterUser") == INSECURE_PRINCIPAL.encode()
        assert await call(server.port, ADMIN, "Rebuild", bearer([])) == INSECURE_PRINCIPAL.encode()


async def test_without_an_authenticator_calls_run_anonymously(serve: ServeFactory):
    async with serve(None) as server:
        assert await call(server.port, COMMANDS, "RegisterUser") == ANONYMOUS.encode()


async def test_an_unknown_method_is_unimplemented_whatever_the_token(serve: ServeFactory):
    async with serve(authenticator()) as server:
        error = await failure(server.port, COMMANDS, "NoSuchMethod")
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_tokens_never_reach_the_logs(serve: ServeFactory, caplog):
    metadata_bad = bearer(["users:write"], key=b"another-key-another-key-another-key!")
    metadata_weak = bearer(["users:read"])
    caplog.set_level("DEBUG")
    async with serve(authenticator()) as server:
        await failure(server.port, COMMANDS, "RegisterUser", metadata_bad)
        await failure(server.port, COMMANDS, "RegisterUser", metadata_weak)
        await call(server.port, QUERIES, "GetUser", metadata_weak)
    records = "\n".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
    assert "call refused: bad signature" in records
    assert "call refused: missing scope users:write" in records
    for metadata in (metadata_bad, metadata_weak):
        token = metadata[0][1].removeprefix("Bearer ")
        assert token not in records
        assert token.split(".")[2] not in records
