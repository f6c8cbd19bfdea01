"""A real stack on throwaway servers that the hostile tests can watch: every statement Postgres
runs is logged (log_statement=all) and every Redis command is seen through MONITOR.

Each test module gets its own EmbeddedPostgres, EmbeddedRedis and Stack (default StackConfig
apart from the URLs and fast password hashing), so pausing or watching a server never
touches another module or the machine's shared servers.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.servers import EmbeddedPostgres, EmbeddedRedis
from devstack.supervisor import Stack, StackConfig
from read_service.generations import checkpoint_key, pointer_key
from tests.e2e.conftest import FAST_HASHING

WRITE_APPLICATION = "tessera-write-service"
READ_KEY_KINDS = (
    "users:view:",
    "users:by_email",
    "users:idx:",
    "users:spent:",
    "users:tri:",
    "catalog:view:",
    "catalog:idx:",
    "orders:view:",
    "orders:customer:",
    "orders:idx:",
    "orders:stats:",
    "orders:tri:",
)
# The commands the query path sends (ZCARD, ZINTER and the walk's ZRANGEBYSCORE and ZMSCORE
# inside its script: the search index, read_service.search); the projector's writes go
# through EVALSHA instead.
QUERY_COMMANDS = frozenset(
    {
        "GET",
        "MGET",
        "HGET",
        "HGETALL",
        "ZRANGE",
        "ZRANGEBYLEX",
        "ZREVRANGEBYLEX",
        "ZRANGEBYSCORE",
        "ZREVRANGEBYSCORE",
        "ZCARD",
        "ZINTER",
        "ZMSCORE",
    }
)


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker of this directory's tests."""
    config.addinivalue_line("markers", "hostile: bad and hostile input against the real processes")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test in this directory as hostile (and e2e: it starts the real processes)."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.hostile)
            item.add_marker(pytest.mark.e2e)


# --- watching Postgres -------------------------------------------------------------------


class PostgresLog:
    """Reads what a throwaway Postgres with log_statement=all wrote to its log."""

    def __init__(self, server: EmbeddedPostgres) -> None:
        self.server = server

    def size(self) -> int:
        """Current length of the log, to read only what comes after."""
        return self.server.log_path.stat().st_size

    def since(self, offset: int) -> str:
        """Log text written after `offset`."""
        with self.server.log_path.open("rb") as handle:
            handle.seek(offset)
            return handle.read().decode("utf-8", errors="replace")

    async def sync(self, url: str, within: float = 5.0) -> None:
        """Return once everything Postgres ran before this call is in the log file."""
        marker = f"log-sync-{secrets.token_hex(6)}"
        start = self.size()
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f"SELECT '{marker}'")
        finally:
            await conn.close()
        deadline = time.monotonic() + within
        while marker not in self.since(start):
            if time.monotonic() > deadline:
                raise AssertionError(f"marker {marker} never reached the Postgres log")
            await asyncio.sleep(0.005)

    @staticmethod
    def statements_by(text: str, application: str) -> list[str]:
        """The logged statements (with their DETAIL parameter lines) run by `application`."""
        found: list[str] = []
        current: list[str] | None = None
        for line in text.splitlines():
            match = re.match(r"^\S+ \S+ \S+ \[\d+\] app=(\S*) (\w+):\s+(.*)$", line)
            if match is None:
                if current is not None:
                    current.append(line)  # continuation of a multi-line statement
                continue
            app, level, message = match.groups()
            if current is not None:
                found.append("\n".join(current))
                current = None
            if app != application:
                continue
            if level == "LOG" and re.match(r"(statement|execute [^:]*):", message):
                current = [message]
            elif level == "DETAIL" and found and message.startswith("parameters:"):
                found[-1] += "\n" + message
        if current is not None:
            found.append("\n".join(current))
        return found


# --- watching Redis ----------------------------------------------------------------------


class RedisMonitor:
    """Collects every command a Redis server runs (MONITOR) in a background thread."""

    def __init__(self, host: str, port: int) -> None:
        self._address = (host, port)
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = socket.create_connection(self._address, timeout=5)
        self._sock.sendall(b"MONITOR\r\n")
        self._buffer = b""
        first = self._read_line(deadline=time.monotonic() + 5)
        if first != "+OK":
            raise AssertionError(f"MONITOR answered {first!r}")
        self._sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._run, name="redis-monitor", daemon=True)
        self._thread.start()

    def _read_line(self, deadline: float) -> str | None:
        while b"\r\n" not in self._buffer:
            if time.monotonic() > deadline:
                return None
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line.decode("utf-8", errors="replace")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                line = self._read_line(deadline=time.monotonic() + 0.2)
            except OSError:
                return
            if line is not None:
                with self._lock:
                    self._lines.append(line)

    def size(self) -> int:
        """How many commands were seen so far."""
        with self._lock:
            return len(self._lines)

    def since(self, index: int) -> list[str]:
        """The MONITOR lines seen after the first `index`."""
        with self._lock:
            return self._lines[index:]

    async def sync(self, within: float = 5.0) -> None:
        """Return once every command Redis ran before this call has been seen."""
        marker = f"monitor-sync-{secrets.token_hex(6)}"
        start = self.size()
        with socket.create_connection(self._address, timeout=within) as sock:
            sock.sendall(f"ECHO {marker}\r\n".encode())
            sock.recv(1024)
        deadline = time.monotonic() + within
        while not any(marker in line for line in self.since(start)):
            if time.monotonic() > deadline:
                raise AssertionError(f"marker {marker} never showed up in MONITOR")
            await asyncio.sleep(0.005)

    @staticmethod
    def query_commands(lines: list[str], prefix: str) -> list[str]:
        """The lines that are a query-path read of the views under `prefix`."""
        found = []
        for line in lines:
            args = re.findall(r'"((?:[^"\\]|\\.)*)"', line)
            if len(args) < 2 or args[0].upper() not in QUERY_COMMANDS:
                continue
            if not args[1].startswith(prefix):
                continue
            # The views live in a generation's key space (read_service.generations).
            rest = re.sub(r"^\{[a-z]+@v\d+g\d+\}:", "", args[1][len(prefix) :])
            if rest.startswith(READ_KEY_KINDS):
                found.append(line)
        return found

    def close(self) -> None:
        """Stop reading and close the connection."""
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


# --- the stack ---------------------------------------------------------------------------


@dataclass
class HostileStack:
    """The running stack, its servers, and what watches them."""

    stack: Stack
    postgres: EmbeddedPostgres
    redis: EmbeddedRedis
    prefix: str
    pg_log: PostgresLog
    channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)

    @property
    def database_url(self) -> str:
        """DSN of the stack's database."""
        return self.postgres.url

    def channel(self, address: str) -> grpc.aio.Channel:
        """One cached channel per address."""
        if address not in self.channels:
            self.channels[address] = grpc.aio.insecure_channel(address)
        return self.channels[address]

    @property
    def write(self) -> grpc.aio.Channel:
        """Channel to the write service."""
        return self.channel(self.stack.write_address)

    @property
    def read(self) -> grpc.aio.Channel:
        """Channel to the first read replica."""
        return self.channel(self.stack.read_addresses[0])

    async def wait_quiet(self, within: float = 15.0) -> None:
        """Wait until every committed event is published and applied to the views."""
        deadline = time.monotonic() + within
        conn = await asyncpg.connect(self.database_url)
        client = self.redis.client()
        try:
            while True:
                pending = await conn.fetchval(
                    "SELECT count(*) FROM outbox CROSS JOIN relay_state"
                    " WHERE NOT coalesce(position <= published_position, false)"
                )
                head = await conn.fetchval("SELECT last_position FROM relay_state")
                generation = await asyncio.to_thread(client.get, pointer_key(self.prefix, "users"))
                name = generation.decode() if isinstance(generation, bytes) else generation
                key = None if name is None else checkpoint_key(self.prefix, "users", name)
                checkpoint = 0 if key is None else int(await asyncio.to_thread(client.get, key) or 0)
                if pending == 0 and checkpoint == head:
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"not quiet: {pending} unpublished, checkpoint {checkpoint} of {head}")
                await asyncio.sleep(0.02)
        finally:
            client.close()
            await conn.close()

    async def assert_healthy(self) -> None:
        """Every process still runs and every gRPC server reports SERVING."""
        self.stack.check()
        for address in [self.stack.write_address, *self.stack.read_addresses]:
            stub = health_pb2_grpc.HealthStub(self.channel(address))
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, address

    def service_logs(self) -> dict[str, str]:
        """Each service's log so far."""
        return {p.name: p.log_path.read_text(errors="replace") for p in self.stack.processes}


@pytest.fixture(scope="module")
def stack_env() -> Mapping[str, str]:
    """Extra environment for the module's services (override in a module to change it)."""
    return {}


@pytest.fixture(scope="module")
def stack_shape() -> dict[str, Any]:
    """StackConfig fields beyond the defaults (override in a module to change it)."""
    return {}


@pytest.fixture(scope="module")
async def hostile(
    tmp_path_factory: pytest.TempPathFactory, stack_env: Mapping[str, str], stack_shape: dict[str, Any]
) -> AsyncIterator[HostileStack]:
    """A stack over a throwaway Postgres (every statement logged) and a throwaway Redis."""
    postgres = EmbeddedPostgres(
        settings={"log_statement": "all", "log_line_prefix": "%m [%p] app=%a ", "log_min_duration_statement": "-1"}
    )
    redis = EmbeddedRedis()
    await asyncio.to_thread(postgres.start)
    try:
        await asyncio.to_thread(redis.start)
        prefix = f"hostile:{secrets.token_hex(4)}:"
        config = StackConfig(
            database_url=postgres.url,
            redis_url=redis.url,
            redis_key_prefix=prefix,
            log_dir=tmp_path_factory.mktemp("hostile-logs"),
            env={**FAST_HASHING, **stack_env},
            **stack_shape,
        )
        stack = await Stack(config).start_async()
        running = HostileStack(stack, postgres, redis, prefix, PostgresLog(postgres))
        try:
            yield running
        finally:
            for channel in running.channels.values():
                await channel.close()
            await stack.stop_async()
    finally:
        await asyncio.to_thread(redis.stop)
        await asyncio.to_thread(postgres.stop)


@pytest.fixture(scope="module")
def monitor(hostile: HostileStack) -> Iterator[RedisMonitor]:
    """MONITOR on the module's Redis, for the rest of the module."""
    watcher = RedisMonitor(hostile.redis.host, hostile.redis.port)
    try:
        yield watcher
    finally:
        watcher.close()
