"""The composed service: bootstrap wiring, health, and the process's start and graceful stop."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from devstack.in_process import replica_settings
from read_service.bootstrap import running_read_service
from read_service.settings import ReadServiceSettings
from tessera.users.v1 import user_query_service_pb2 as pb
from tessera.users.v1.user_query_service_pb2_grpc import UserQueryServiceStub

from .conftest import EventLog, UserFactory, eventually

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]


def settings_for(database_url: str, redis_url: str, prefix: str, port: int = 0) -> ReadServiceSettings:
    return replica_settings(
        database_url,
        redis_url,
        prefix,
        grpc_port=port,
        page_token_secret=SecretStr("integration-test-secret-0123456789"),
    )


async def health_status(channel: grpc.aio.Channel, service: str = "") -> Any:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return reply.status


async def test_not_serving_until_caught_up_then_serving(
    database_url: str,
    redis_server_url: str,
    redis_prefix: str,
    redis_client: aioredis.Redis,
    event_log: EventLog,
    users: UserFactory,
):
    user_id, registered = users.register("boot@example.com", "boot")
    await event_log.append(registered)
    settings = settings_for(database_url, redis_server_url, redis_prefix)

    # Hold the event log locked so the first catch-up cannot finish yet.
    blocker = await asyncpg.connect(database_url)
    transaction = blocker.transaction()
    await transaction.start()
    await blocker.execute("LOCK TABLE relay_state, outbox IN ACCESS EXCLUSIVE MODE")
    try:
        async with running_read_service(settings) as service:
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
            stub = UserQueryServiceStub(channel)
            try:
                assert await health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
                assert (
                    await health_status(channel, "tessera.users.v1.UserQueryService")
                    == health_pb2.HealthCheckResponse.NOT_SERVING
                )
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.ListUsers(pb.ListUsersRequest())
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

                await transaction.rollback()

                async def serving() -> bool:
                    return bool(await health_status(channel) == health_pb2.HealthCheckResponse.SERVING)

                await eventually(serving, message="health never became SERVING")
                reply = await stub.GetUser(pb.GetUserRequest(user_id=user_id))
                assert reply.user.email == "boot@example.com"
                assert service.projector.status().checkpoint == 1
            finally:
                await channel.close()
        assert service.projector.task is not None and service.projector.task.done()
    finally:
        if not blocker.is_closed():
            await blocker.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_the_process_serves_and_stops_cleanly_on_sigterm(
    database_url: str, redis_server_url: str, redis_prefix: str, redis_client: aioredis.Redis
):
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_server_url,
        "REDIS_KEY_PREFIX": redis_prefix,
        "GRPC_HOST": "127.0.0.1",
        "GRPC_PORT": str(port),
        "GRPC_SHUTDOWN_GRACE_S": "1",
        "PAGE_TOKEN_SECRET": "integration-test-secret-0123456789",
        "AUTH_MODE": "insecure",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "read_service",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:

        async def serving() -> bool:
            if process.returncode is not None:
                raise AssertionError("the process exited early")
            try:
                return bool(await health_status(channel) == health_pb2.HealthCheckResponse.SERVING)
            except grpc.aio.AioRpcError:
                return False

        await eventually(serving, timeout=30, message="the process never became SERVING")
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
        assert process.returncode == 0, stderr.decode()
        assert time.monotonic() - started < 15
        assert b"shutting down" in stderr
    finally:
        await channel.close()
        if process.returncode is None:
            process.kill()
            await process.wait()
