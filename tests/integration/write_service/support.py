"""Helpers shared by the write service's integration tests: waits, and the real process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.servers import find_free_port
from write_service.entrypoints.grpc_server import SERVICE_NAME

ROOT = Path(__file__).resolve().parents[3]


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
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "GRPC_", "ARGON2_", "COMMAND_"))}
    env.update(overrides)
    return env


async def wait_until_serving(channel: grpc.aio.Channel, timeout: float = 30) -> None:
    """Return once the write service reports SERVING on `channel`; fail after `timeout`."""
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


@dataclass
class WriteServiceProcess:
    """A running `python -m write_service` and a channel to it."""

    process: asyncio.subprocess.Process
    channel: grpc.aio.Channel

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
            yield WriteServiceProcess(process, channel)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
