"""Redis loses the views (a restart without persistence, FLUSHALL): the replica notices, stops
serving, rebuilds from the Postgres event log and serves again, and never answers from the
emptied key space as if it were the truth."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devstack.servers import EmbeddedRedis
from devstack.supervisor import Stack, one_replica_config
from tessera.users.v1 import user_query_service_pb2 as qry
from tessera.users.v1 import user_query_service_pb2_grpc as qry_grpc
from tessera_client import TesseraClient
from tests.e2e.conftest import FAST_HASHING

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

USERS = 40
NOTICE_WITHIN_S = 2.0
SERVE_AGAIN_WITHIN_S = 60.0
REDIS_DOWN_S = 1.0
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
async def throwaway_redis() -> AsyncIterator[EmbeddedRedis]:
    """A Redis server of this module alone, without persistence: a restart loses everything."""
    server = await asyncio.to_thread(EmbeddedRedis().start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


@pytest.fixture(scope="module")
async def loss_stack(e2e_database: str, throwaway_redis: EmbeddedRedis, e2e_logs: Path) -> AsyncIterator[Stack]:
    """Write service, one relay and one replica on the throwaway Redis."""
    config = one_replica_config(e2e_database, throwaway_redis.url, "loss", e2e_logs, env=FAST_HASHING)
    running = await Stack(config).start_async()
    try:
        yield running
    finally:
        await running.stop_async()


@pytest.fixture(scope="module")
async def user_ids(loss_stack: Stack) -> list[str]:
    """Users registered through the write service, visible on the replica."""
    async with TesseraClient(loss_stack.write_address, None, timeout=30.0) as client:
        tag = secrets.token_hex(3)
        replies = await asyncio.gather(
            *(
                client.users.register_user(
                    email=f"loss{i}.{tag}@example.com",
                    username=f"loss{i}_{tag}",
                    password="correct horse battery",
                    full_name=f"Loss {i}",
                )
                for i in range(USERS)
            )
        )
    ids = [r.user_id for r in replies]
    await wait_all_present(loss_stack.read_addresses[0], ids, within=30)
    return ids


async def wait_all_present(address: str, ids: list[str], within: float) -> None:
    """Wait until the replica answers every user; fail at the deadline."""
    deadline = time.monotonic() + within
    async with grpc.aio.insecure_channel(address) as channel:
        stub = qry_grpc.UserQueryServiceStub(channel)
        missing = list(ids)
        while missing:
            try:
                await stub.GetUser(qry.GetUserRequest(user_id=missing[-1]), timeout=2)
                missing.pop()
                continue
            except grpc.aio.AioRpcError as error:
                if error.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                    raise
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(missing)} users still missing after {within:g} s")
            await asyncio.sleep(0.05)


@dataclass
class Observer:
    """Watches the replica's health (Watch stream) and keeps querying it, recording what it says."""

    address: str
    ids: list[str]
    statuses: list[tuple[float, int]] = field(default_factory=list)
    # (started, finished, code) of every query that did not return the user.
    failures: list[tuple[float, float, grpc.StatusCode]] = field(default_factory=list)
    answered: int = 0

    async def watch_health(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            async for reply in stub.Watch(health_pb2.HealthCheckRequest()):
                self.statuses.append((time.monotonic(), reply.status))

    async def query(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = qry_grpc.UserQueryServiceStub(channel)
            i = 0
            while True:
                user_id = self.ids[i % len(self.ids)]
                i += 1
                started = time.monotonic()
                try:
                    reply = await stub.GetUser(qry.GetUserRequest(user_id=user_id), timeout=2)
                    assert reply.user.user_id == user_id
                    self.answered += 1
                except grpc.aio.AioRpcError as error:
                    self.failures.append((started, time.monotonic(), error.code()))
                    await asyncio.sleep(0.01)

    def first_status_after(self, since: float, status: int | None = None, other_than: int | None = None) -> float:
        for at, value in self.statuses:
            if at >= since and (status is None or value == status) and (other_than is None or value != other_than):
                return at
        return -1.0

    def lies(self, loss_done: float) -> list[tuple[float, float, grpc.StatusCode]]:
        """Queries that answered NOT_FOUND for a registered user although they started after the loss."""
        return [f for f in self.failures if f[2] is grpc.StatusCode.NOT_FOUND and f[0] >= loss_done]


@contextlib.asynccontextmanager
async def observing(address: str, ids: list[str]) -> AsyncIterator[Observer]:
    observer = Observer(address, ids)
    tasks = [asyncio.create_task(observer.watch_health()), asyncio.create_task(observer.query())]
    try:
        deadline = time.monotonic() + 10
        while not observer.statuses or observer.statuses[-1][1] != SERVING:
            assert time.monotonic() < deadline, "the replica is not SERVING before the fault"
            await asyncio.sleep(0.02)
        yield observer
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await task


async def wait_serving_after(observer: Observer, since: float, within: float) -> float:
    deadline = time.monotonic() + within
    while True:
        at = observer.first_status_after(since, status=SERVING)
        if at > 0:
            return at
        assert time.monotonic() < deadline, f"not SERVING again within {within:g} s"
        await asyncio.sleep(0.02)


async def test_a_redis_restart_is_noticed_reported_and_rebuilt(
    loss_stack: Stack, throwaway_redis: EmbeddedRedis, user_ids: list[str]
) -> None:
    address = loss_stack.read_addresses[0]
    async with observing(address, user_ids) as observer:
        killed_at = time.monotonic()
        await asyncio.to_thread(throwaway_redis.kill)
        deadline = killed_at + NOTICE_WITHIN_S
        while observer.first_status_after(killed_at, other_than=SERVING) < 0:
            assert time.monotonic() < deadline, "health did not leave SERVING within 2 s of the restart"
            await asyncio.sleep(0.02)
        noticed_s = observer.first_status_after(killed_at, other_than=SERVING) - killed_at
        # While Redis is gone, queries are refused, not answered.
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await qry_grpc.UserQueryServiceStub(channel).GetUser(qry.GetUserRequest(user_id=user_ids[0]), timeout=5)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        await asyncio.sleep(REDIS_DOWN_S)  # the outage itself
        await asyncio.to_thread(throwaway_redis.start)
        back_at = time.monotonic()
        serving_at = await wait_serving_after(observer, back_at, SERVE_AGAIN_WITHIN_S)
        await wait_all_present(address, user_ids, within=5)

    assert noticed_s < NOTICE_WITHIN_S
    assert observer.lies(killed_at) == [], "a query answered NOT_FOUND from the emptied Redis"
    assert serving_at > back_at
    assert observer.answered > 0


async def test_a_flushall_is_noticed_reported_and_rebuilt(
    loss_stack: Stack, throwaway_redis: EmbeddedRedis, user_ids: list[str]
) -> None:
    address = loss_stack.read_addresses[0]
    await wait_all_present(address, user_ids, within=30)
    client = aioredis.Redis.from_url(throwaway_redis.url)
    try:
        async with observing(address, user_ids) as observer:
            flushed_at = time.monotonic()
            await client.flushall()
            flush_done = time.monotonic()
            deadline = flushed_at + NOTICE_WITHIN_S
            while observer.first_status_after(flushed_at, other_than=SERVING) < 0:
                assert time.monotonic() < deadline, "health did not leave SERVING within 2 s of FLUSHALL"
                await asyncio.sleep(0.01)
            noticed_s = observer.first_status_after(flushed_at, other_than=SERVING) - flushed_at
            await wait_serving_after(observer, flushed_at + noticed_s, SERVE_AGAIN_WITHIN_S)
            await wait_all_present(address, user_ids, within=5)
    finally:
        await client.aclose()

    assert noticed_s < NOTICE_WITHIN_S
    # A query already past its checkpoint read when the flush landed may miss; none started after it.
    assert observer.lies(flush_done) == [], "a query answered NOT_FOUND from the flushed key space"
