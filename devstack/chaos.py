"""The stack a chaos scenario runs against, and the observers that measure it.

`ChaosStack` starts a throwaway Postgres and Redis of its own (optionally behind fault
proxies), applies migrations and starts the real services on free ports. `PositionRecorder`
is an independent pub/sub subscriber that records every position the relay publishes.
The helpers find the active relay, wait for the outbox to drain and for the views to
converge, always with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import grpc
import redis
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.replication import ReplicatedPostgres
from devstack.servers import EmbeddedPostgres, EmbeddedRedis
from devstack.supervisor import ServiceProcess, Stack, StackConfig
from devstack.tcp_proxy import TcpProxy
from read_service.generations import served_checkpoint
from relay.settings import DEFAULT_LOCK_KEY
from tessera.events.v1.envelope_pb2 import EventEnvelope
from tessera.users.v1 import user_query_service_pb2 as queries
from tessera.users.v1 import user_query_service_pb2_grpc as queries_grpc

KEY_PREFIX = "chaos:"
# Cheap argon2 keeps registration from dominating the run; the rest are the defaults.
SERVICE_ENV = {
    "ARGON2_TIME_COST": "1",
    "ARGON2_MEMORY_COST_KIB": "1024",
    "ARGON2_PARALLELISM": "1",
    "PAGE_TOKEN_SECRET": "chaos-suite-page-token-secret",
    "LOG_LEVEL": "INFO",
}


@dataclass
class ChaosStack:
    """Postgres, Redis, optional proxies in front of them, and the services, owned by one scenario."""

    log_dir: Path
    relays: int = 2
    readers: int = 2
    redis_args: Sequence[str] = ()
    proxied: bool = False
    # "sync" or "async": a primary and a streaming standby instead of one Postgres, reached
    # through a multi-host URL (`postgres` is then the primary).
    replication: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    cluster: ReplicatedPostgres | None = None
    postgres: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None
    pg_proxy: TcpProxy | None = None
    redis_proxy: TcpProxy | None = None
    stack: Stack | None = None

    # -- what the checks connect to (always the servers themselves, never a proxy)

    @property
    def database_url(self) -> str:
        """Direct URL of the scenario's Postgres (the multi-host URL of a replicated one)."""
        if self.cluster is not None:
            return self.cluster.url
        assert self.postgres is not None
        return self.postgres.url

    @property
    def redis_url(self) -> str:
        """Direct URL of the scenario's Redis."""
        assert self.redis is not None
        return self.redis.url

    @property
    def services(self) -> Stack:
        """The running services."""
        assert self.stack is not None
        return self.stack

    def start(self) -> ChaosStack:
        """Start everything (blocking); stop what started if anything fails."""
        try:
            if self.replication is not None:
                self.cluster = ReplicatedPostgres(synchronous=self.replication == "sync").start()
                self.postgres = self.cluster.primary
            else:
                self.postgres = EmbeddedPostgres().start()
            self.redis = EmbeddedRedis(extra_args=list(self.redis_args)).start()
            database_url, redis_url = self.database_url, self.redis.url
            if self.proxied:
                self.pg_proxy = TcpProxy(self.postgres.host, self.postgres.port).start()
                self.redis_proxy = TcpProxy(self.redis.host, self.redis.port).start()
                database_url = self.postgres.url.replace(f":{self.postgres.port}/", f":{self.pg_proxy.port}/")
                redis_url = f"redis://{self.redis_proxy.address}/0"
            config = StackConfig(
                database_url=database_url,
                redis_url=redis_url,
                redis_key_prefix=KEY_PREFIX,
                relays=self.relays,
                read_ports=(0,) * self.readers,
                log_dir=self.log_dir,
                env={**SERVICE_ENV, **self.env},
            )
            self.stack = Stack(config).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop services, proxies and servers (blocking); idempotent."""
        if self.stack is not None:
            self.stack.stop()
        for proxy in (self.pg_proxy, self.redis_proxy):
            if proxy is not None:
                proxy.stop()
        if self.redis is not None:
            self.redis.stop()
        if self.cluster is not None:
            self.cluster.stop()
        elif self.postgres is not None:
            self.postgres.stop()

    def unexpected_exits(self) -> list[str]:
        """Services that exited without being asked to (a crash is a finding, not a fault we injected)."""
        return [f"{p.name} exited: {p.returncode}" for p in self.services.processes if p.failed]


@contextlib.asynccontextmanager
async def chaos_stack(log_dir: Path, **options: Any) -> AsyncIterator[ChaosStack]:
    """Start a ChaosStack in a worker thread and stop it on the way out."""
    running = await asyncio.to_thread(ChaosStack(log_dir, **options).start)
    try:
        yield running
    finally:
        await asyncio.to_thread(running.stop)


# --- an independent subscriber ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    """One envelope as the subscriber received it."""

    position: int
    received_at: float  # wall clock, comparable with occurred_at on the same machine
    occurred_at: float


class PositionRecorder:
    """Subscribes to the events channel in a thread of its own and records every delivery.

    It connects to Redis directly (never through a proxy) and re-subscribes after a
    disconnect, counting the gaps it cannot have seen.
    """

    def __init__(self, redis_url: str, prefix: str = KEY_PREFIX) -> None:
        self._url = redis_url
        self._channel = f"{prefix}events"
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._thread: threading.Thread | None = None
        self.deliveries: list[Delivery] = []
        self.disconnects = 0

    def start(self, timeout_s: float = 10.0) -> PositionRecorder:
        """Start and return once the first subscription is confirmed."""
        self._thread = threading.Thread(target=self._run, name="position-recorder", daemon=True)
        self._thread.start()
        if not self._subscribed.wait(timeout_s):
            raise AssertionError("the recording subscriber could not subscribe")
        return self

    def stop(self) -> None:
        """Stop recording."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10.0)

    def highest(self) -> int:
        """The highest position received so far."""
        return max((d.position for d in self.deliveries), default=0)

    def _run(self) -> None:
        while not self._stop.is_set():
            client = redis.Redis.from_url(self._url, socket_timeout=2.0, socket_connect_timeout=2.0)
            pubsub = client.pubsub()
            try:
                pubsub.subscribe(self._channel)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self._subscribed.set()
                    elif message["type"] == "message":
                        received = time.time()
                        envelope = EventEnvelope.FromString(message["data"])
                        occurred = envelope.occurred_at.seconds + envelope.occurred_at.nanos / 1e9
                        self.deliveries.append(Delivery(envelope.position, received, occurred))
            except (redis.RedisError, OSError):
                self.disconnects += 1
                self._stop.wait(0.1)
            finally:
                with contextlib.suppress(redis.RedisError, OSError):
                    pubsub.close()
                client.close()

    def figures(self, head: int, *, complete: bool = True) -> dict[str, Any]:
        """Deliveries against the outbox's 1..head: missing, duplicates, first deliveries out of order, lag.

        `complete` says whether the subscriber can have seen everything (no Redis restart in
        the scenario, and it never lost its own connection); otherwise missing positions are
        the subscriber's loss, not the relay's.
        """
        complete = complete and self.disconnects == 0
        seen: set[int] = set()
        duplicates = 0
        inversions = 0
        highest_first = 0
        lags: list[float] = []
        for delivery in self.deliveries:
            if delivery.position in seen:
                duplicates += 1
                continue
            seen.add(delivery.position)
            if delivery.position < highest_first:
                inversions += 1
            highest_first = max(highest_first, delivery.position)
            lags.append(delivery.received_at - delivery.occurred_at)
        missing = sum(1 for position in range(1, head + 1) if position not in seen)
        lags.sort()
        return {
            "delivered": len(self.deliveries),
            "distinct_delivered": len(seen),
            "duplicate_deliveries": duplicates,
            "missing_at_subscriber": missing,
            "subscriber_complete": complete,
            "first_delivery_inversions": inversions,
            "subscriber_disconnects": self.disconnects,
            "max_publish_lag_s": round(lags[-1], 3) if lags else None,
            "p99_publish_lag_s": round(lags[min(len(lags) - 1, int(0.99 * len(lags)))], 3) if lags else None,
            "median_publish_lag_s": round(lags[len(lags) // 2], 3) if lags else None,
        }


# --- the relays -----------------------------------------------------------------------------


async def lock_holder_port(database_url: str, key: int = DEFAULT_LOCK_KEY) -> int | None:
    """Client port of the session that holds the relay lock in `database_url`'s database, or None when nobody does.

    Advisory locks belong to a database: on a server shared by several stacks each one's relays
    hold the same key in their own database.
    """
    conn = await asyncpg.connect(database_url, timeout=5)
    try:
        port: int | None = await conn.fetchval(
            "SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
            " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND l.classid = $1::bigint::oid AND l.objid = $2::bigint::oid",
            key >> 32,
            key & 0xFFFFFFFF,
            timeout=5,
        )
    finally:
        await conn.close()
    return port


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return inodes


def _inodes_of_connection(local_port: int, remote_port: int) -> set[str]:
    """Inodes of the live TCP sockets from `local_port` to `remote_port`.

    Linux hands the same ephemeral port to connections towards different destinations, and
    closed connections linger in TIME_WAIT with inode 0: matching the local port alone can
    find some other socket, every time, for as long as that one lives.
    """
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) != local_port or fields[9] == "0":
                    continue
                if int(fields[2].rsplit(":", 1)[1], 16) == remote_port:
                    inodes.add(fields[9])
    return inodes


def pid_owning_connection(pids: Sequence[int], port: int, remote_port: int) -> int | None:
    """The pid (among `pids`) with a socket from local `port` to `remote_port`."""
    inodes = _inodes_of_connection(port, remote_port)
    if not inodes:
        return None
    return next((pid for pid in pids if inodes & _socket_inodes(pid)), None)


def process_owning_port(processes: Sequence[ServiceProcess], port: int, remote_port: int) -> ServiceProcess | None:
    """The process (among `processes`) with a socket from local `port` to `remote_port`."""
    running = {process.pid: process for process in processes if process.running and process.pid is not None}
    pid = pid_owning_connection(list(running), port, remote_port)
    return running[pid] if pid is not None else None


async def active_relay(stack: ChaosStack) -> ServiceProcess | None:
    """The relay process whose session holds the lock (found through its client port), if any.

    Behind the Postgres proxy the lock session's client port is the proxy's, so this only
    works without one.
    """
    port = await lock_holder_port(stack.database_url)
    if port is None:
        return None
    server_port = urlsplit(stack.database_url).port
    if server_port is None:
        raise AssertionError(f"the stack's database URL names no port: {stack.database_url}")
    return process_owning_port(stack.services.relays, port, server_port)


# --- waiting for the system to settle -------------------------------------------------------


async def outbox_state(database_url: str) -> tuple[int, int, int]:
    """(rows, rows without a position, rows not yet published)."""
    conn = await asyncpg.connect(database_url, timeout=5)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS n, count(*) FILTER (WHERE position IS NULL) AS unpositioned,"
            " count(*) FILTER (WHERE NOT coalesce(position <= published_position, false)) AS unpublished"
            " FROM outbox CROSS JOIN relay_state",
            timeout=10,
        )
    finally:
        await conn.close()
    assert row is not None
    return int(row["n"]), int(row["unpositioned"]), int(row["unpublished"])


async def wait_drained(database_url: str, timeout_s: float) -> tuple[int, float]:
    """Wait until every outbox row is positioned and published; return (rows, seconds waited)."""
    started = time.monotonic()
    while True:
        try:
            rows, unpositioned, unpublished = await outbox_state(database_url)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            rows, unpositioned, unpublished = 0, 1, 1
        if not unpositioned and not unpublished:
            return rows, time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            return rows, time.monotonic() - started
        await asyncio.sleep(0.05)


async def replica_serving(address: str, timeout_s: float = 1.0) -> bool:
    """Whether a replica's health check says SERVING."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def checkpoint(redis_url: str) -> int:
    """The users views' checkpoint in Redis (0 when Redis is empty or down)."""
    client = aioredis.Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    try:
        return await served_checkpoint(client, KEY_PREFIX, "users")
    except (redis.RedisError, OSError):
        return 0
    finally:
        await client.aclose()


async def head_position(database_url: str) -> int:
    """The relay's last assigned position."""
    conn = await asyncpg.connect(database_url, timeout=5)
    try:
        value = await conn.fetchval("SELECT last_position FROM relay_state", timeout=5)
    finally:
        await conn.close()
    return int(value or 0)


async def wait_caught_up(stack: ChaosStack, target: int, timeout_s: float) -> float | None:
    """Seconds until the views' checkpoint reaches `target` and every replica is SERVING; None on timeout."""
    started = time.monotonic()
    addresses = stack.services.read_addresses
    while time.monotonic() - started < timeout_s:
        if await checkpoint(stack.redis_url) >= target:
            serving = await asyncio.gather(*(replica_serving(a) for a in addresses))
            if all(serving):
                return time.monotonic() - started
        await asyncio.sleep(0.05)
    return None


# --- views against Postgres -----------------------------------------------------------------


_VIEW_FIELDS = ("email", "username", "full_name", "bio", "avatar_url", "active", "deactivation_reason", "version")


async def expected_views(database_url: str) -> dict[str, dict[str, Any]]:
    """Every user as Postgres has it, keyed by id, in the fields a view carries."""
    conn = await asyncpg.connect(database_url, timeout=5)
    try:
        query = f"SELECT id::text AS user_id, {', '.join(_VIEW_FIELDS)} FROM users"  # noqa: S608 - constant columns
        rows = await conn.fetch(query, timeout=30)
    finally:
        await conn.close()
    return {row["user_id"]: {name: row[name] for name in _VIEW_FIELDS} for row in rows}


async def _diverged_on(address: str, expected: dict[str, dict[str, Any]], user_ids: Sequence[str]) -> list[str]:
    """Users whose view on one replica differs from Postgres (or cannot be read)."""
    wrong: list[str] = []
    limit = asyncio.Semaphore(32)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = queries_grpc.UserQueryServiceStub(channel)

        async def check(user_id: str) -> None:
            async with limit:
                try:
                    reply = await stub.GetUser(queries.GetUserRequest(user_id=user_id), timeout=5.0)
                except grpc.aio.AioRpcError:
                    wrong.append(user_id)
                    return
            view = reply.user
            if any(getattr(view, name) != value for name, value in expected[user_id].items()):
                wrong.append(user_id)

        await asyncio.gather(*(check(user_id) for user_id in user_ids))
    return wrong


async def converge_views(stack: ChaosStack, timeout_s: float) -> tuple[dict[str, int], float | None, int]:
    """Compare every replica's GetUser for every user with Postgres until they all match.

    Returns (diverged users per replica at the end, seconds until all matched or None, users).
    Only the users that still differ are asked again; a last full pass confirms the result.
    """
    expected = await expected_views(stack.database_url)
    started = time.monotonic()
    pending = {address: list(expected) for address in stack.services.read_addresses}
    converged_after: float | None = None
    while True:
        results = await asyncio.gather(*(_diverged_on(a, expected, ids) for a, ids in pending.items()))
        pending = dict(zip(pending, results, strict=True))
        if not any(pending.values()):
            converged_after = time.monotonic() - started
            break
        if time.monotonic() - started > timeout_s:
            break
        await asyncio.sleep(0.2)
    if converged_after is not None:
        final = await asyncio.gather(
            *(_diverged_on(a, expected, list(expected)) for a in stack.services.read_addresses)
        )
        pending = dict(zip(stack.services.read_addresses, final, strict=True))
    return {address: len(ids) for address, ids in pending.items()}, converged_after, len(expected)


async def served_absent(stack: ChaosStack, user_ids: Sequence[str]) -> dict[str, int]:
    """Per replica, how many of `user_ids` (users Postgres does not have) it still answers with a view."""

    async def count(address: str) -> int:
        served = 0
        async with grpc.aio.insecure_channel(address) as channel:
            stub = queries_grpc.UserQueryServiceStub(channel)
            for user_id in user_ids:
                try:
                    await stub.GetUser(queries.GetUserRequest(user_id=user_id), timeout=5.0)
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.NOT_FOUND:
                        served += 1  # not a clean "no such user" either
                    continue
                served += 1
        return served

    addresses = stack.services.read_addresses
    return dict(zip(addresses, await asyncio.gather(*(count(a) for a in addresses)), strict=True))


def new_log_dir(base: Path, name: str) -> Path:
    """A directory for one scenario's service logs."""
    path = base / f"{name}-{secrets.token_hex(3)}"
    path.mkdir(parents=True)
    return path
