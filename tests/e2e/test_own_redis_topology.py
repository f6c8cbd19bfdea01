"""The "own Redis" topology: each replica keeps its views in a Redis of its own and applies the stream itself.

First the two key spaces are two database numbers of the test Redis server: pub/sub is
server-wide, so both replicas hear the relay's stream whichever database they keep views in.
Then a replica keeps its views in a Redis server of its own and reads the stream from the
relays' server (REDIS_EVENTS_URL). Each catches up from the Postgres event log by itself and
serves correct views without the other.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis.asyncio as aioredis

from devstack.servers import EmbeddedRedis
from devstack.supervisor import ServiceProcess, Stack, StackConfig
from tessera.users.v1 import user_command_service_pb2 as cmd
from tessera.users.v1 import user_query_service_pb2 as qry
from tessera_client import TesseraClient

from .conftest import FAST_HASHING, running_stack

pytestmark = pytest.mark.e2e


def with_db(url: str, db: int) -> str:
    """`url` pointing at Redis database number `db`."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{db}"))


@pytest.fixture(scope="module")
def view_dbs() -> tuple[int, int]:
    """Two database numbers for the replicas' views (the relay publishes through database 0)."""
    first, second = random.sample(range(1, 16), 2)
    return first, second


@pytest.fixture(scope="module")
async def write_only_stack(
    e2e_database: str, redis_server_url: str, e2e_prefix: str, e2e_logs: Path, view_dbs: tuple[int, int]
) -> AsyncIterator[Stack]:
    """Write service and relays only: the test starts the replicas, each on its own key space."""
    config = StackConfig(
        database_url=e2e_database,
        redis_url=with_db(redis_server_url, 0),
        redis_key_prefix=e2e_prefix,
        log_dir=e2e_logs,
        migrate=False,
        env=FAST_HASHING,
        read_ports=(),
    )
    async with running_stack(config, redis_server_url) as running:
        yield running
    for db in view_dbs:
        client = aioredis.Redis.from_url(with_db(redis_server_url, db))
        keys = [key async for key in client.scan_iter(match=f"{e2e_prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def own_redis_replica(stack: Stack, name: str, redis_url: str, events_url: str | None = None) -> ServiceProcess:
    """A replica whose views live at `redis_url` (started, not yet waited for)."""
    env = {**stack.service_env(), "REDIS_URL": redis_url}
    if events_url is not None:
        env["REDIS_EVENTS_URL"] = events_url
    return ServiceProcess.python_module(
        name, "read_service", env=env, grpc_port=0, log_path=stack.log_dir / f"{name}.log"
    ).start()


@pytest.fixture
def replicas(
    write_only_stack: Stack, redis_server_url: str, view_dbs: tuple[int, int]
) -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    try:
        for index, db in enumerate(view_dbs, start=1):
            started.append(own_redis_replica(write_only_stack, f"read-own-{index}", with_db(redis_server_url, db)))
        yield started
    finally:
        for process in started:
            process.terminate(grace=10)


async def get_user(stack: Stack, address: str, user_id: str, token: str) -> qry.GetUserResponse:
    """GetUser with `token` on the replica at `address` alone, through the client library."""
    async with TesseraClient(stack.write_address, [address], session=False) as tessera:
        request = qry.GetUserRequest(user_id=user_id, consistency_token=token, max_wait_ms=10_000)
        return await tessera.users.get_user(request, timeout=15)


async def test_replicas_with_their_own_redis_each_apply_the_stream_and_serve_correct_views(
    write_only_stack: Stack, replicas: list[ServiceProcess], redis_server_url: str, view_dbs: tuple[int, int]
) -> None:
    async with TesseraClient(write_only_stack.write_address, None) as tessera:
        commands = tessera.users
        unique = secrets.token_hex(4)
        ada = await commands.register_user(
            cmd.RegisterUserRequest(
                email=f"ada.{unique}@example.com", username=f"ada_{unique}", password="own-redis-Pa55", full_name="Ada"
            ),
            timeout=10,
        )
        grace = await commands.register_user(
            cmd.RegisterUserRequest(
                email=f"grace.{unique}@example.com",
                username=f"grace_{unique}",
                password="own-redis-Pa55",
                full_name="Grace",
            ),
            timeout=10,
        )
        # The replicas started with the stack's events already in the log: each catches up by itself.
        for process in replicas:
            await process.wait_healthy_async(60)
        renamed = await commands.update_user_profile(
            cmd.UpdateUserProfileRequest(user_id=ada.user_id, full_name="Ada King"), timeout=10
        )
        gone = await commands.deactivate_user(
            cmd.DeactivateUserRequest(user_id=grace.user_id, reason="moved on"), timeout=10
        )
        for process in replicas:
            reply = await get_user(write_only_stack, process.address, ada.user_id, renamed.consistency_token)
            assert not reply.stale
            assert (reply.user.full_name, reply.user.version, reply.user.active) == ("Ada King", 2, True)
            reply = await get_user(write_only_stack, process.address, grace.user_id, gone.consistency_token)
            assert not reply.stale
            assert (reply.user.version, reply.user.active) == (2, False)

        # Each key space holds views of its own.
        prefix = write_only_stack.config.redis_key_prefix
        counts = []
        for db in view_dbs:
            client = aioredis.Redis.from_url(with_db(redis_server_url, db))
            counts.append(len([key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]))
            await client.aclose()
        assert all(count > 0 for count in counts), counts

        # One replica down does not hold the other back; back up, it catches up by itself.
        stopped, running = replicas
        stopped.terminate(grace=10)
        again = await commands.update_user_profile(
            cmd.UpdateUserProfileRequest(user_id=ada.user_id, full_name="Ada, Countess"), timeout=10
        )
        reply = await get_user(write_only_stack, running.address, ada.user_id, again.consistency_token)
        assert (reply.stale, reply.user.full_name, reply.user.version) == (False, "Ada, Countess", 3)
        stopped.start()
        await stopped.wait_healthy_async(60)
        reply = await get_user(write_only_stack, stopped.address, ada.user_id, again.consistency_token)
        assert (reply.stale, reply.user.full_name, reply.user.version) == (False, "Ada, Countess", 3)


async def test_a_replica_with_a_redis_server_of_its_own_reads_the_stream_from_the_relays_redis(
    write_only_stack: Stack, redis_server_url: str
) -> None:
    with EmbeddedRedis() as own:
        replica = own_redis_replica(write_only_stack, "read-own-server", own.url, events_url=redis_server_url)
        try:
            async with TesseraClient(write_only_stack.write_address, None) as tessera:
                commands = tessera.users
                unique = secrets.token_hex(4)
                await replica.wait_healthy_async(60)
                # Written after the replica is up: reaching it takes the live stream from the other server.
                registered = await commands.register_user(
                    cmd.RegisterUserRequest(
                        email=f"mary.{unique}@example.com",
                        username=f"mary_{unique}",
                        password="own-server-Pa55",
                        full_name="Mary",
                    ),
                    timeout=10,
                )
                renamed = await commands.update_user_profile(
                    cmd.UpdateUserProfileRequest(user_id=registered.user_id, full_name="Mary Somerville"), timeout=10
                )
                reply = await get_user(write_only_stack, replica.address, registered.user_id, renamed.consistency_token)
                assert not reply.stale
                assert (reply.user.full_name, reply.user.version) == ("Mary Somerville", 2)
            # The views are in the replica's own server, not in the relays'.
            prefix = write_only_stack.config.redis_key_prefix
            client = own.client()
            try:
                assert any(True for _ in client.scan_iter(match=f"{prefix}*", count=1000))
            finally:
                client.close()
        finally:
            replica.terminate(grace=10)
