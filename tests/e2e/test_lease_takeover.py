"""The applying lease end to end: kill -9 of the replica that applies, in the middle of a 5,000-event stream.

Two replicas share one Redis (a server of this module alone). Events go into the outbox in
paced batches and reach the replicas through the real relay. When the lease holder has
applied part of the stream it is killed with SIGKILL; the other replica must take the lease
over and finish the stream. Afterwards the views must equal the state the Postgres event log
describes, and a MONITOR of the Redis server, recording every checkpoint write the apply
script made, must show each position written exactly once and in order: no skip, no double
apply, nothing out of order, across the takeover.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import random
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from devstack.servers import EmbeddedRedis
from devstack.supervisor import ServiceProcess, Stack, StackConfig
from read_service.generations import keyspace_prefix, pointer_key, served_checkpoint
from read_service.keys import UserKeys
from read_service.lease import lease_key
from read_service.projections.users import UsersProjection
from shared_kernel.contracts.event_log import NewEvent, append_events
from tessera.users.v1.events_pb2 import UserDeactivated, UserProfileUpdated, UserRegistered
from tessera.users.v1.user_query_service_pb2 import UserView
from tessera_client import TesseraClient
from tests.e2e.conftest import FAST_HASHING

pytestmark = pytest.mark.e2e

EVENTS = 5000
BATCH = 50
BATCH_PAUSE_S = 0.05  # about 6 s of stream, so that the kill and the takeover fall inside it
KILL_AT = 1500
GATE_AT = 2500
# A checkpoint write made by the apply script, as MONITOR shows it.
CHECKPOINT_SET = re.compile(r'\[\d+ lua\] "SET" "([^"]*:checkpoint)" "(\d+)"')


@pytest.fixture(scope="module")
async def throwaway_redis() -> AsyncIterator[EmbeddedRedis]:
    """A Redis server of this module alone, so that MONITOR sees only this stack's commands."""
    server = await asyncio.to_thread(EmbeddedRedis().start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


@pytest.fixture(scope="module")
async def lease_stack(e2e_database: str, throwaway_redis: EmbeddedRedis, e2e_logs: Path) -> AsyncIterator[Stack]:
    """Write service, one relay and two replicas sharing one Redis, with the default lease settings."""
    config = StackConfig(
        database_url=e2e_database,
        redis_url=throwaway_redis.url,
        redis_key_prefix=f"lease:{secrets.token_hex(4)}:",
        relays=1,
        read_ports=(0, 0),
        payment_provider=False,
        saga_workers=0,
        log_dir=e2e_logs,
        migrate=False,
        env={**FAST_HASHING, "READ_APPLY_MODE": "lease"},
    )
    running = await Stack(config).start_async()
    try:
        yield running
    finally:
        await running.stop_async()


def user_events(count: int, seed: int = 4) -> list[NewEvent]:
    """Registrations, profile updates and deactivations of many users, each user's versions in order."""
    rng = random.Random(seed)
    versions: dict[str, int] = {}
    ids: list[str] = []
    events: list[NewEvent] = []
    start = datetime(2025, 1, 1, tzinfo=UTC)
    for n in range(count):
        when = start + timedelta(seconds=n)
        roll = rng.random()
        if not ids or roll < 0.4:
            user_id = str(uuid.uuid4())
            ids.append(user_id)
            tag = secrets.token_hex(4)
            payload: Any = UserRegistered(
                user_id=user_id, email=f"u{n}.{tag}@example.com", username=f"u{n}_{tag}", full_name=f"User {n}"
            )
            payload.registered_at.FromDatetime(when)
        elif roll < 0.9:
            user_id = rng.choice(ids)
            payload = UserProfileUpdated(user_id=user_id, full_name=f"Renamed {n}", bio=str(n))
            payload.updated_at.FromDatetime(when)
        else:
            user_id = rng.choice(ids)
            payload = UserDeactivated(user_id=user_id, reason=f"reason {n}")
            payload.deactivated_at.FromDatetime(when)
        versions[user_id] = versions.get(user_id, 0) + 1
        events.append(NewEvent(payload, "user", user_id, versions[user_id], when))
    return events


async def produce(pool: asyncpg.Pool[Any], events: list[NewEvent], killed: asyncio.Event) -> None:
    """Append the events in paced batches, one transaction each, as many commands would.

    Past GATE_AT events it waits for the kill, so that on a slow machine too the kill falls
    in the middle of the stream, never after its end.
    """
    for start in range(0, len(events), BATCH):
        if start >= GATE_AT:
            await killed.wait()
        async with pool.acquire() as conn, conn.transaction():
            await append_events(conn, events[start : start + BATCH], correlation_id="lease-e2e", causation_id="e2e")
        await asyncio.sleep(BATCH_PAUSE_S)


async def audit_checkpoint_writes(url: str, writes: dict[str, list[int]], listening: asyncio.Event) -> None:
    """Record every checkpoint write the apply script makes, per checkpoint key, until cancelled."""
    client = aioredis.Redis.from_url(url)
    try:
        async with client.monitor() as monitor:
            listening.set()
            assert monitor.connection is not None
            while True:
                raw = await monitor.connection.read_response()
                line = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
                match = CHECKPOINT_SET.search(line)
                if match is not None:
                    writes[match.group(1)].append(int(match.group(2)))
    finally:
        await client.aclose()


async def holder_of(client: aioredis.Redis, key: str, readers: list[ServiceProcess]) -> ServiceProcess | None:
    """The replica whose process holds the lease `key` (tokens are `<replica id>/<pid>#<random>`)."""
    token = await client.get(key)
    if not isinstance(token, bytes):
        return None
    pid = int(token.decode().split("#", 1)[0].rsplit("/", 1)[1])
    return next((reader for reader in readers if reader.pid == pid), None)


async def expected_state(pool: asyncpg.Pool[Any]) -> dict[str, tuple[int, str, bool]]:
    """Per user: (version, full name, active), replayed from the Postgres event log in position order."""
    state: dict[str, tuple[int, str, bool]] = {}
    rows = await pool.fetch(
        "SELECT aggregate_id, aggregate_version, event_type, payload FROM outbox "
        "WHERE aggregate_type = 'user' ORDER BY position"
    )
    for row in rows:
        user_id, version, kind = str(row["aggregate_id"]), row["aggregate_version"], row["event_type"]
        _, name, active = state.get(user_id, (0, "", True))
        if kind.endswith("UserRegistered"):
            registered = UserRegistered.FromString(row["payload"])
            # Schema version 1 (as written above) or 2 (the write service): decision 0030.
            name = registered.display_name or registered.full_name
        elif kind.endswith("UserProfileUpdated"):
            name = UserProfileUpdated.FromString(row["payload"]).full_name
        elif kind.endswith("UserDeactivated"):
            active = False
        state[user_id] = (version, name, active)
    return state


async def wait_until(check: Any, timeout: float, message: str, interval: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        await asyncio.sleep(interval)


async def test_kill_9_of_the_applying_replica_mid_stream_loses_and_repeats_nothing(
    lease_stack: Stack, throwaway_redis: EmbeddedRedis, e2e_database: str
) -> None:
    prefix = lease_stack.config.redis_key_prefix
    client = aioredis.Redis.from_url(throwaway_redis.url)
    pool: asyncpg.Pool[Any] = await asyncpg.create_pool(e2e_database, min_size=1, max_size=4)
    writes: dict[str, list[int]] = collections.defaultdict(list)
    listening = asyncio.Event()
    auditor = asyncio.create_task(audit_checkpoint_writes(throwaway_redis.url, writes, listening))
    producer: asyncio.Task[None] | None = None
    try:
        await asyncio.wait_for(listening.wait(), 10)
        key = lease_key(prefix, "users", int(getattr(UsersProjection, "version", 1)))

        async def has_holder() -> bool:
            return await holder_of(client, key, lease_stack.readers) is not None

        await wait_until(has_holder, 30, "no replica took the users lease", interval=0.05)
        holder = await holder_of(client, key, lease_stack.readers)
        assert holder is not None
        survivor = next(reader for reader in lease_stack.readers if reader is not holder)

        events = user_events(EVENTS)
        killed = asyncio.Event()
        producer = asyncio.create_task(produce(pool, events, killed))

        async def past_kill_point() -> bool:
            return await served_checkpoint(client, prefix, "users") >= KILL_AT

        await wait_until(past_kill_point, 60, "the stream never reached the kill point", interval=0.01)
        holder.kill()
        killed_at = time.monotonic()
        killed.set()
        at_kill = await served_checkpoint(client, prefix, "users")
        assert at_kill < EVENTS

        async def applying_again() -> bool:
            return await served_checkpoint(client, prefix, "users") > at_kill

        await wait_until(applying_again, 30, "nobody applied after the holder was killed")
        takeover_s = time.monotonic() - killed_at
        assert await holder_of(client, key, lease_stack.readers) is survivor

        await asyncio.wait_for(producer, 120)

        async def all_positioned() -> bool:
            return bool(await pool.fetchval("SELECT count(*) = count(position) FROM outbox"))

        await wait_until(all_positioned, 60, "the relay did not position every event", interval=0.05)
        head = int(await pool.fetchval("SELECT max(position) FROM outbox"))
        assert head >= EVENTS

        async def caught_up() -> bool:
            return await served_checkpoint(client, prefix, "users") == head

        await wait_until(caught_up, 60, "the survivor did not reach the head", interval=0.05)

        # The views equal the state the event log describes.
        pointer = await client.get(pointer_key(prefix, "users"))
        assert isinstance(pointer, bytes)
        generation = pointer.decode()
        keys = UserKeys(keyspace_prefix(prefix, "users", generation))
        expected = await expected_state(pool)
        raw_views = await client.mget([keys.view(user_id) for user_id in expected])
        actual = {}
        for user_id, raw in zip(expected, raw_views, strict=True):
            assert isinstance(raw, bytes), f"no view of {user_id}"
            view = UserView.FromString(raw)
            actual[user_id] = (view.version, view.full_name, view.active)
        assert actual == expected

        # And the survivor serves them.
        some_user = next(iter(expected))
        async with TesseraClient(lease_stack.write_address, [survivor.address], session=False) as tessera:
            reply = await tessera.users.get_user(user_id=some_user, timeout=10)
        assert reply.user.version == expected[some_user][0]
        assert reply.view_position == head

        # Every checkpoint the apply script wrote, in Redis's own order: 1, 2, ..., head, each once.
        await asyncio.sleep(0)
        users_key = keys.checkpoint
        assert writes[users_key] == list(range(1, head + 1)), "users checkpoint writes out of order"
        # The projections that ignore user events move their checkpoint over runs of them in one
        # write, so theirs may jump, but never stand still or go back, and they end at the head.
        out_of_order = 0
        for key, positions in writes.items():
            out_of_order += sum(1 for before, after in itertools.pairwise(positions) if after <= before)
            assert positions[-1] == head, f"{key} stopped at {positions[-1]}, not at the head {head}"
        assert out_of_order == 0
        refused = survivor.log_path.read_text().count("duplicate apply refused")
        print(
            f"\nlease takeover: holder killed at checkpoint {at_kill}; the other replica applied again "
            f"after {takeover_s * 1000:.0f} ms; {head} events, {len(expected)} users, "
            f"0 out-of-order checkpoint writes over {len(writes)} projections, {refused} duplicate applies refused"
        )
    finally:
        if producer is not None and not producer.done():
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer
        auditor.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await auditor
        await pool.close()
        await client.aclose()
