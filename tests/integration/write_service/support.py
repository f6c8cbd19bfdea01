"""Helpers shared by the write service's integration tests: waits, and the real process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.servers import find_free_port
from shared_kernel.platform.grpc_server import GrpcServer
from shared_kernel.platform.security.authn import reset_principal, set_principal
from tessera.catalog.v1 import catalog_command_service_pb2_grpc as catalog_grpc
from tessera.orders.v1 import order_command_service_pb2_grpc as orders_grpc
from tessera.users.v1 import user_command_service_pb2_grpc as users_grpc
from write_service import bootstrap
from write_service.entrypoints.catalog import CATALOG_SERVICE_NAME
from write_service.entrypoints.orders import ORDER_SERVICE_NAME
from write_service.entrypoints.users import USER_SERVICE_NAME
from write_service.settings import WriteServiceSettings

ROOT = Path(__file__).resolve().parents[3]
PRINCIPAL_HEADER = "x-test-principal"


class PrincipalFromHeader(grpc.aio.ServerInterceptor):
    """Stands in for authentication: binds the principal a test header names for the call."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner: Callable[..., Any] = handler.unary_unary

        async def with_principal(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            metadata = dict(context.invocation_metadata() or ())
            token = set_principal(str(metadata.get(PRINCIPAL_HEADER, "anonymous")))
            try:
                return await inner(request, context)
            finally:
                reset_principal(token)

        return grpc.unary_unary_rpc_method_handler(
            with_principal,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


@asynccontextmanager
async def in_process_write_server(
    pool: asyncpg.Pool[Any], command_timeout_s: float = 5.0
) -> AsyncIterator[grpc.aio.Channel]:
    """The real GrpcServer with every command servicer of `bootstrap.build` on port 0, and a channel to it.

    Calls run as the principal the PRINCIPAL_HEADER header names ("anonymous" without it).
    """
    settings = WriteServiceSettings(
        grpc_host="127.0.0.1",
        grpc_port=0,
        grpc_shutdown_grace_s=1.0,
        command_timeout_s=command_timeout_s,
        argon2_time_cost=1,
        argon2_memory_cost_kib=8,
        argon2_parallelism=1,
    )
    service = bootstrap.build(pool, settings)
    server = GrpcServer(
        settings, [USER_SERVICE_NAME, CATALOG_SERVICE_NAME, ORDER_SERVICE_NAME], interceptors=[PrincipalFromHeader()]
    )
    server.add(users_grpc.add_UserCommandServiceServicer_to_server, service.servicer)
    server.add(catalog_grpc.add_CatalogCommandServiceServicer_to_server, service.catalog_servicer)
    server.add(orders_grpc.add_OrderCommandServiceServicer_to_server, service.order_servicer)
    port = await server.start()
    await server.set_serving(True)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop()


async def wait_until_blocked(pool: asyncpg.Pool[Any], timeout: float = 5.0) -> None:
    """Return once some session of the test database waits on a lock; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        waiting = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        if waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no session started waiting on a lock")


def environment(**overrides: str) -> dict[str, str]:
    """This process's environment without the service settings a developer may have exported, plus `overrides`."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "GRPC_", "ARGON2_", "COMMAND_", "WRITE_"))
    }
    env.update(overrides)
    return env


async def wait_until_serving(channel: grpc.aio.Channel, timeout: float = 30) -> None:
    """Return once the write service reports SERVING on `channel`; fail after `timeout`."""
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while True:
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=USER_SERVICE_NAME), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("the write service never reported SERVING")
        await asyncio.sleep(0.1)


@dataclass
class WriteServiceProcess:
    """A running `python -m write_service` and a channel to it."""

    process: asyncio.subprocess.Process
    channel: grpc.aio.Channel
    address: str

    async def terminate(self, timeout: float = 20) -> tuple[int, str]:
        """SIGTERM, wait for the exit, and return (exit code, stderr)."""
        self.process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(self.process.communicate(), timeout)
        assert self.process.returncode is not None
        return self.process.returncode, stderr.decode()


@asynccontextmanager
async def running_write_service(database_url: str, **env: str) -> AsyncIterator[WriteServiceProcess]:
    """Start the real write service on a free port (cheap hashing, no auth) and wait until it serves."""
    port = find_free_port()
    settings = {
        "DATABASE_URL": database_url,
        "GRPC_HOST": "127.0.0.1",
        "GRPC_PORT": str(port),
        "GRPC_SHUTDOWN_GRACE_S": "2",
        "ARGON2_TIME_COST": "1",
        "ARGON2_MEMORY_COST_KIB": "8",
        "ARGON2_PARALLELISM": "1",
        "AUTH_MODE": "insecure",
        **env,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "write_service",
        cwd=ROOT,
        env=environment(**settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await wait_until_serving(channel)
            yield WriteServiceProcess(process, channel, f"127.0.0.1:{port}")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
