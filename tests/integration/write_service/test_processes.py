"""The real processes: `python -m write_service.migrate` and `python -m write_service`."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tessera.users.v1 import user_command_service_pb2 as pb
from tessera.users.v1 import user_command_service_pb2_grpc as pb_grpc
from tests.conftest import create_database, drop_database
from tests.unit.write_service import helpers
from write_service.entrypoints.grpc_server import SERVICE_NAME

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]


def environment(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "GRPC_", "ARGON2_", "COMMAND_"))}
    env.update(overrides)
    return env


async def run_module(module: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return subprocess.CompletedProcess([module], process.returncode, stdout.decode(), stderr.decode())


@pytest.fixture
async def empty_database(postgres_admin_url: str) -> AsyncIterator[str]:
    url = await create_database(postgres_admin_url, migrate=False)
    try:
        yield url
    finally:
        await drop_database(postgres_admin_url, url)


async def test_migrate_applies_once_then_reports_nothing_pending(empty_database):
    first = await run_module("write_service.migrate", environment(DATABASE_URL=empty_database))
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        "applied 0001_users_outbox_command_log",
        "applied 0002_idempotency_and_audit",
        "applied 0003_email_key",
    ]
    second = await run_module("write_service.migrate", environment(DATABASE_URL=empty_database))
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "no pending migrations"


async def test_migrate_gives_up_at_its_deadline():
    started = time.monotonic()
    result = await run_module(
        "write_service.migrate",
        environment(DATABASE_URL="postgresql://postgres@127.0.0.1:1/postgres", MIGRATE_WAIT_S="0.5"),
    )
    assert result.returncode == 1
    assert "migrate failed" in result.stderr
    assert time.monotonic() - started < 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_until_serving(channel: grpc.aio.Channel, timeout: float = 30) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while True:
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("the write service never reported SERVING")
        await asyncio.sleep(0.1)


async def test_the_service_serves_then_stops_cleanly_on_sigterm(database_url):
    port = free_port()
    env = environment(
        DATABASE_URL=database_url,
        GRPC_HOST="127.0.0.1",
        GRPC_PORT=str(port),
        GRPC_SHUTDOWN_GRACE_S="2",
        ARGON2_TIME_COST="1",
        ARGON2_MEMORY_COST_KIB="8",
        ARGON2_PARALLELISM="1",
        LOG_FORMAT="json",
        AUTH_MODE="insecure",
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "write_service", cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await wait_until_serving(channel)
            stub = pb_grpc.UserCommandServiceStub(channel)
            reply = await stub.RegisterUser(
                pb.RegisterUserRequest(
                    email=f"p{helpers.suffix()}@example.com",
                    username=f"p{helpers.suffix()}",
                    password=helpers.PASSWORD,
                    full_name="Process Test",
                ),
                timeout=10,
            )
            assert reply.version == 1
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 20)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode()
    log = stderr.decode()
    assert "write service serving" in log
    assert "shutting down" in log
    assert helpers.PASSWORD not in log
