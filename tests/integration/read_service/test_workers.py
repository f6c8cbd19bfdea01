"""A worker group: several read service processes on one port (READ_WORKERS), run by one parent."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import PostgresDsn, RedisDsn

from devstack.in_process import replica_settings
from devstack.processes import children, wait_gone
from devstack.supervisor import ServiceProcess
from read_service.bootstrap import running_read_service
from read_service.settings import ReadServiceSettings
from read_service.workers import REPLICA_HEADER, ReplicaHeaderInterceptor, WorkerGroup, reserve_port
from shared_kernel.contracts.consistency import encode_token
from shared_kernel.platform.grpc_errors import bad_request_from_status
from tessera.users.v1 import user_query_service_pb2 as pb
from tessera.users.v1.user_query_service_pb2_grpc import UserQueryServiceStub

if TYPE_CHECKING:
    from tessera.users.v1.user_query_service_pb2_grpc import UserQueryServiceAsyncStub

from .conftest import EventLog, UserFactory, eventually

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
REPLICA_ID = "itest-replica"
GRACE_S = 1.0


def group_env(database_url: str, redis_url: str, prefix: str, workers: int = 2) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": prefix,
        "READ_WORKERS": str(workers),
        "READ_REPLICA_ID": REPLICA_ID,
        "READ_WORKER_RESTART_MAX_BACKOFF_S": "1",
        "GRPC_SHUTDOWN_GRACE_S": str(GRACE_S),
        "PAGE_TOKEN_SECRET": "integration-test-secret-0123456789",
        "AUTH_MODE": "insecure",
        "DATABASE_POOL_MIN_SIZE": "1",
        "LOG_FORMAT": "json",
    }


async def answer(address: str) -> tuple[str, int]:
    """(x-tessera-replica, health status) from a health check over a connection of its own."""
    # A local subchannel pool: a new TCP connection, which the kernel may hand to another worker.
    async with grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        call = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        reply = await call
        metadata = dict(await call.initial_metadata())
    return str(metadata[REPLICA_HEADER]), reply.status


async def status_or_none(address: str) -> int | None:
    try:
        return (await answer(address))[1]
    except grpc.aio.AioRpcError:
        return None


def pid_of(header: str) -> int:
    replica, _, pid = header.rpartition("/")
    assert replica == REPLICA_ID
    return int(pid)


async def worker_pids_seen(address: str, connections: int = 40) -> set[int]:
    return {pid_of((await answer(address))[0]) for _ in range(connections)}


def listening_port(log_path: Path) -> int | None:
    """The port the group's parent announced in its (JSON) log, if it did yet."""
    for line in log_path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if record.get("message") == "read worker group listening":
            return int(str(record["address"]).rpartition(":")[2])
    return None


async def test_workers_share_a_port_chosen_by_the_parent_and_stop_together_on_sigterm(
    database_url: str,
    redis_server_url: str,
    redis_prefix: str,
    redis_client: aioredis.Redis,
    event_log: EventLog,
    users: UserFactory,
):
    user_id, registered = users.register("group@example.com", "group")
    await event_log.append(registered)
    env = {**group_env(database_url, redis_server_url, redis_prefix), "GRPC_HOST": "127.0.0.1", "GRPC_PORT": "0"}
    group = ServiceProcess.python_module("read-group", "read_service", env=env).start()
    try:
        await eventually(lambda: listening_port(group.log_path), timeout=30, message="no port announced")
        port = listening_port(group.log_path)
        assert port is not None and port > 0
        address = f"127.0.0.1:{port}"
        await eventually(lambda: _serving(address, group), timeout=60, message="the group never became SERVING")

        assert group.pid is not None
        workers = set(children(group.pid))
        assert len(workers) == 2
        # The kernel spreads connections over both workers; each names itself in every reply.
        assert await worker_pids_seen(address) == workers

        async with grpc.aio.insecure_channel(address) as channel:
            stub = UserQueryServiceStub(channel)
            call = stub.GetUser(pb.GetUserRequest(user_id=user_id), timeout=5)
            assert (await call).user.email == "group@example.com"
            assert pid_of(str(dict(await call.trailing_metadata())[REPLICA_HEADER])) in workers
            # Failed calls name the worker too.
            missing = stub.GetUser(pb.GetUserRequest(user_id="00000000-0000-4000-8000-000000000000"), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await missing
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            assert pid_of(str(dict(await missing.trailing_metadata())[REPLICA_HEADER])) in workers

        started = time.monotonic()
        assert group.pid is not None
        os.kill(group.pid, signal.SIGTERM)
        code = await asyncio.to_thread(group.wait, 30.0)
        assert code == 0, group.log_tail()
        assert time.monotonic() - started < GRACE_S + 5
        assert wait_gone(workers, 5) == []
        log = group.log_path.read_text()
        assert log.count('"shutting down"') == 2, "each worker drains and stops by itself"
        assert "read worker group stopped" in log
    finally:
        group.kill()


async def _serving(address: str, group: ServiceProcess) -> bool:
    if not group.running:
        raise AssertionError(f"the group exited: {group.log_tail()}")
    return bool(await status_or_none(address) == SERVING)


async def test_a_dead_worker_makes_the_group_not_serving_until_its_replacement_is_ready(
    database_url: str, redis_server_url: str, redis_prefix: str, redis_client: aioredis.Redis
):
    env = group_env(database_url, redis_server_url, redis_prefix)
    group = ServiceProcess.python_module("read-group", "read_service", env=env, grpc_port=0).start()
    try:
        address = group.address
        await eventually(lambda: _serving(address, group), timeout=60, message="the group never became SERVING")
        assert group.pid is not None
        first = set(children(group.pid))
        victim = min(first)
        os.kill(victim, signal.SIGKILL)

        # Whichever worker the probe reaches, it reports the group: NOT_SERVING while one is missing.
        async def not_serving() -> bool:
            return bool(await status_or_none(address) == NOT_SERVING)

        await eventually(not_serving, timeout=10, message="the group kept reporting SERVING with a worker dead")
        await eventually(lambda: _serving(address, group), timeout=60, message="the group never recovered")
        assert group.pid is not None
        now = set(children(group.pid))
        assert len(now) == 2
        assert victim not in now
        assert first - {victim} <= now
        assert await worker_pids_seen(address) == now
        assert "read worker exited unexpectedly; restarting it" in group.log_tail(200)

        # The parent dies without a word: the workers notice and stop by themselves.
        os.kill(group.pid, signal.SIGKILL)
        assert await asyncio.to_thread(wait_gone, now, GRACE_S + 10) == []
    finally:
        group.kill()


def test_a_port_already_taken_is_refused(database_url: str, redis_server_url: str, redis_prefix: str):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {**group_env(database_url, redis_server_url, redis_prefix), "GRPC_HOST": "127.0.0.1"}
        env["GRPC_PORT"] = str(port)
        group = ServiceProcess.python_module("read-group", "read_service", env=env).start()
        try:
            assert group.wait(30) == 1
            assert "already in use" in group.log_tail()
        finally:
            group.kill()


def test_reserved_port_is_shared_only_with_reuseport_sockets():
    reserved, port = reserve_port("127.0.0.1", 0)
    try:
        assert port > 0
        with socket.socket() as plain, pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
        with socket.socket() as sharer:
            sharer.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sharer.bind(("127.0.0.1", port))
            sharer.listen()
    finally:
        for sock in reserved:
            sock.close()


async def test_a_crash_loop_stops_the_group_with_exit_code_1(tmp_path: Path):
    # An "interpreter" whose every worker dies at once, before it could ever become ready.
    crasher = tmp_path / "crasher"
    crasher.write_text("#!/bin/sh\nexit 3\n")
    crasher.chmod(crasher.stat().st_mode | stat.S_IXUSR)
    settings = ReadServiceSettings(
        database_url=PostgresDsn("postgresql://unused@127.0.0.1:1/unused"),
        redis_url=RedisDsn("redis://127.0.0.1:1/0"),
        grpc_host="127.0.0.1",
        grpc_port=0,
        read_workers=2,
        read_worker_max_crashes=3,
        read_worker_restart_max_backoff_s=0.1,
    )
    group = WorkerGroup(settings, python=str(crasher))
    started = time.monotonic()
    assert await asyncio.wait_for(group.run(), 30) == 1
    assert time.monotonic() - started < 10
    assert group.pids == []


async def test_a_worker_that_cannot_be_started_stops_the_group(tmp_path: Path):
    settings = ReadServiceSettings(
        database_url=PostgresDsn("postgresql://unused@127.0.0.1:1/unused"),
        redis_url=RedisDsn("redis://127.0.0.1:1/0"),
        grpc_host="127.0.0.1",
        grpc_port=0,
        read_workers=2,
    )
    group = WorkerGroup(settings, python=str(tmp_path / "no-such-interpreter"))
    assert await asyncio.wait_for(group.run(), 30) == 1
    assert group.pids == []


async def test_the_replica_header_travels_with_every_kind_of_reply(
    database_url: str,
    redis_server_url: str,
    redis_prefix: str,
    redis_client: aioredis.Redis,
    event_log: EventLog,
    users: UserFactory,
):
    user_id, registered = users.register("header@example.com", "header")
    await event_log.append(registered)
    settings = replica_settings(database_url, redis_server_url, redis_prefix)
    interceptor = ReplicaHeaderInterceptor("in-process")
    async with (
        running_read_service(settings, interceptors=[interceptor]) as service,
        grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel,
    ):
        stub: UserQueryServiceAsyncStub = UserQueryServiceStub(channel)

        async def visible() -> bool:
            try:
                await stub.GetUser(pb.GetUserRequest(user_id=user_id), timeout=2)
            except grpc.aio.AioRpcError:
                return False
            return True

        await eventually(visible, message="the user never became visible")
        # Version 2 is in the log but never published: the wait runs out and the servicer sends its stale header.
        await event_log.append(users.update(user_id, "Never Published"))
        call = stub.GetUser(
            pb.GetUserRequest(user_id=user_id, consistency_token=encode_token("user", user_id, 2), max_wait_ms=200),
            timeout=10,
        )
        assert (await call).stale
        assert dict(await call.initial_metadata())["x-tessera-stale"] == "true"
        # A query's reply carries it as a trailer, also when the call sent initial metadata of its own.
        assert dict(await call.trailing_metadata())[REPLICA_HEADER] == interceptor.value == f"in-process/{os.getpid()}"
        assert REPLICA_HEADER not in dict(await call.initial_metadata())
        # A failed query keeps it beside the status details.
        missing = stub.GetUser(pb.GetUserRequest(user_id="00000000-0000-4000-8000-000000000000"), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await missing
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert dict(caught.value.trailing_metadata() or ())[REPLICA_HEADER] == interceptor.value
        invalid = stub.GetUser(pb.GetUserRequest(user_id="not-a-uuid"), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await invalid
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(caught.value.trailing_metadata() or ())[REPLICA_HEADER] == interceptor.value
        assert bad_request_from_status(caught.value) is not None

        # Health checks carry it as initial metadata.
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert (await check).status == SERVING
        assert dict(await check.initial_metadata())[REPLICA_HEADER] == interceptor.value

        # Server streams carry it too: the health Watch (which client-side health checking uses).
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10)
        async for reply in watch:
            assert reply.status == SERVING
            break
        assert dict(await watch.initial_metadata())[REPLICA_HEADER] == interceptor.value
        watch.cancel()


async def test_sigterm_lets_every_workers_calls_in_flight_finish(
    database_url: str,
    redis_server_url: str,
    redis_prefix: str,
    redis_client: aioredis.Redis,
    event_log: EventLog,
    users: UserFactory,
):
    user_id, registered = users.register("drain@example.com", "drain")
    await event_log.append(registered)
    env = group_env(database_url, redis_server_url, redis_prefix)
    group = ServiceProcess.python_module("read-group", "read_service", env=env, grpc_port=0).start()
    channels = [
        grpc.aio.insecure_channel(group.address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(12)
    ]
    try:
        await eventually(lambda: _serving(group.address, group), timeout=60, message="the group never became SERVING")
        # Version 2 is in the log but never published: each query waits out its budget, then answers stale.
        await event_log.append(users.update(user_id, "Never Published"))
        request = pb.GetUserRequest(
            user_id=user_id, consistency_token=encode_token("user", user_id, 2), max_wait_ms=700
        )
        calls = []
        for channel in channels:
            stub: UserQueryServiceAsyncStub = UserQueryServiceStub(channel)
            calls.append(stub.GetUser(request, timeout=10))
        await asyncio.sleep(0.2)  # let the calls reach the workers before the signal
        assert group.pid is not None
        os.kill(group.pid, signal.SIGTERM)
        replies = await asyncio.gather(*calls)
        assert all(reply.stale and reply.user.version == 1 for reply in replies)
        served_by = {pid_of(str(dict(await call.trailing_metadata())[REPLICA_HEADER])) for call in calls}
        assert len(served_by) == 2, "both workers had calls in flight"
        assert await asyncio.to_thread(group.wait, 30.0) == 0, group.log_tail()
    finally:
        for channel in channels:
            await channel.close()
        group.kill()
