"""An in-process GrpcServer hosting stand-in services whose names drive the scope rules.

The handlers answer with the principal they see, so tests can check what the interceptor
bound. They need neither Postgres nor Redis.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import grpc
import pytest

from shared_kernel.platform.grpc_server import GrpcServer
from shared_kernel.platform.security.authn import Authenticator, current_principal
from shared_kernel.platform.settings import GrpcServerSettings

COMMANDS = "tessera.users.v1.UserCommandService"
QUERIES = "tessera.users.v1.UserQueryService"
ADMIN = "tessera.users.v1.UserAdminService"
SERVICES = [COMMANDS, QUERIES, ADMIN]


class Gate:
    """Lets tests hold calls inside a handler and see how many are there."""

    def __init__(self) -> None:
        self.inside = 0
        self.entered = asyncio.Condition()
        self.release = asyncio.Event()

    async def hold(self) -> None:
        async with self.entered:
            self.inside += 1
            self.entered.notify_all()
        try:
            await self.release.wait()
        finally:
            self.inside -= 1

    async def wait_inside(self, count: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout), self.entered:
            await self.entered.wait_for(lambda: self.inside >= count)


def _handlers(gate: Gate) -> list[grpc.GenericRpcHandler]:
    async def whoami(_request: bytes, _context: Any) -> bytes:
        return current_principal().encode()

    async def whoami_stream(_request: bytes, _context: Any) -> AsyncIterator[bytes]:
        for _ in range(3):
            await asyncio.sleep(0)
            yield current_principal().encode()

    async def hold(_request: bytes, _context: Any) -> bytes:
        await gate.hold()
        return b"released"

    return [
        grpc.method_handlers_generic_handler(
            COMMANDS,
            {
                "RegisterUser": grpc.unary_unary_rpc_method_handler(whoami),
                "Hold": grpc.unary_unary_rpc_method_handler(hold),
            },
        ),
        grpc.method_handlers_generic_handler(
            QUERIES,
            {
                "GetUser": grpc.unary_unary_rpc_method_handler(whoami),
                "WatchUsers": grpc.unary_stream_rpc_method_handler(whoami_stream),
            },
        ),
        grpc.method_handlers_generic_handler(ADMIN, {"Rebuild": grpc.unary_unary_rpc_method_handler(whoami)}),
    ]


def unary(channel: grpc.aio.Channel, method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    """A raw-bytes unary caller of `method` (`/service/Method`)."""
    return channel.unary_unary(method)


ServeFactory = Callable[..., AbstractAsyncContextManager[GrpcServer]]


@pytest.fixture
def gate() -> Gate:
    """The gate the `Hold` method waits at."""
    return Gate()


@pytest.fixture
def serve(gate: Gate) -> ServeFactory:
    """`async with serve(authenticator, **settings) as server:` runs the stand-ins on a free port."""

    @asynccontextmanager
    async def running(authenticator: Authenticator | None = None, **overrides: Any) -> AsyncIterator[GrpcServer]:
        fields: dict[str, Any] = {"grpc_host": "127.0.0.1", "grpc_port": 0, "grpc_shutdown_grace_s": 0.5}
        settings = GrpcServerSettings(**{**fields, **overrides})
        server = GrpcServer(settings, SERVICES, authenticator=authenticator)
        server.server.add_generic_rpc_handlers(_handlers(gate))
        await server.start()
        await server.set_serving(True)
        try:
            yield server
        finally:
            gate.release.set()
            await server.stop()

    return running
