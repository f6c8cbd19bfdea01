"""One active relay at a time; a standby takes over when the active one's lock session ends."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from relay.outbox import Fence, LeadershipLost, claim_batch
from relay.runner import Relay, Role
from tessera.events.v1.envelope_pb2 import EventEnvelope
from tests.integration.relay.conftest import RelayHarness
from tests.integration.relay.support import (
    ChannelRecorder,
    Gate,
    HangingPublisher,
    assert_gap_free,
    ids_of,
    insert_events,
    lock_holder_pid,
    wait_until,
)

pytestmark = pytest.mark.integration


async def _wait_for_one_active(*candidates: Relay, timeout: float = 10.0) -> tuple[Relay, list[Relay]]:
    await wait_until(
        lambda: (
            [r.role for r in candidates].count(Role.ACTIVE) == 1
            and all(r.role in (Role.ACTIVE, Role.STANDBY) for r in candidates)
        ),
        timeout,
        "exactly one active relay",
    )
    active = next(r for r in candidates if r.role is Role.ACTIVE)
    return active, [r for r in candidates if r is not active]


async def test_one_active_and_a_standby_takes_over_after_shutdown(
    relays: RelayHarness, published: ChannelRecorder[EventEnvelope]
) -> None:
    first, second = relays.make(), relays.make()
    relays.start(first)
    relays.start(second)
    active, (standby,) = await _wait_for_one_active(first, second)

    before = await insert_events(relays.pool, "a", 10)
    await published.wait_for(lambda m: len(m) >= 10)
    assert standby.role is Role.STANDBY

    await active.shutdown()
    assert active.role is Role.STOPPED
    await wait_until(lambda: standby.role is Role.ACTIVE, 10, "the standby to take over")
    after = await insert_events(relays.pool, "a", 10)

    await published.wait_for(lambda m: ids_of(before + after) <= {e.event_id for e in m})
    assert_gap_free(published.messages, ids_of(before + after))


async def test_losing_the_lock_connection_hands_over(
    relays: RelayHarness, database_url: str, published: ChannelRecorder[EventEnvelope]
) -> None:
    gates = {name: Gate(database_url) for name in ("first", "second")}
    candidates = {name: relays.make(connect=gate.connect) for name, gate in gates.items()}
    for relay in candidates.values():
        relays.start(relay)
    active, (standby,) = await _wait_for_one_active(*candidates.values())
    active_gate = next(gates[n] for n, r in candidates.items() if r is active)
    before = await insert_events(relays.pool, "a", 10)
    await published.wait_for(lambda m: len(m) >= 10)

    # Cut the active relay off from Postgres and end its session, as a network failure would.
    active_gate.open = False
    holder = await lock_holder_pid(relays.pool, relays.settings.relay_lock_key)
    assert holder is not None
    assert await relays.pool.fetchval("SELECT pg_terminate_backend($1)", holder)

    await wait_until(lambda: active.role is not Role.ACTIVE, 5, "the old relay to stop relaying")
    await wait_until(lambda: standby.role is Role.ACTIVE, 10, "the standby to take over")
    after = await insert_events(relays.pool, "a", 10)
    await published.wait_for(lambda m: ids_of(before + after) <= {e.event_id for e in m})
    assert_gap_free(published.messages, ids_of(before + after))

    # Reconnected, the old relay waits as a standby.
    active_gate.open = True
    await wait_until(lambda: active.role is Role.STANDBY, 10, "the old relay to stand by")
    assert standby.role is Role.ACTIVE


async def test_a_lost_lock_connection_cancels_the_batch_in_flight(
    relays: RelayHarness, database_url: str, published: ChannelRecorder[EventEnvelope]
) -> None:
    gate = Gate(database_url)
    hanging = HangingPublisher(relays.real_publisher())
    relay = relays.make(connect=gate.connect, publisher=hanging)
    relays.start(relay)
    await wait_until(lambda: relay.role is Role.ACTIVE, 10, "the relay to become active")
    written = await insert_events(relays.pool, "a", 3)
    await asyncio.wait_for(hanging.entered.wait(), 10)

    gate.open = False
    holder = await lock_holder_pid(relays.pool, relays.settings.relay_lock_key)
    assert holder is not None
    await relays.pool.fetchval("SELECT pg_terminate_backend($1)", holder)

    await asyncio.wait_for(hanging.cancelled.wait(), 5)
    assert relay.role is not Role.ACTIVE
    # The batch kept its positions and is re-published once the relay is back.
    gate.open = True
    await published.wait_for(lambda m: len(m) >= 3)
    assert_gap_free(published.messages, ids_of(written))


async def test_a_claim_is_refused_without_the_lock(relays: RelayHarness, database_url: str) -> None:
    await insert_events(relays.pool, "a", 2)
    # A key with bits in both halves checks how the fence splits it for pg_locks.
    key = 0x1234_5678_9ABC_DEF0
    session = await asyncpg.connect(database_url)
    try:
        fence = Fence(pid=session.get_server_pid(), key=key)
        async with relays.pool.acquire() as conn:
            with pytest.raises(LeadershipLost):
                await claim_batch(conn, 10, fence)
            assert await conn.fetchval("SELECT count(*) FROM outbox WHERE position IS NOT NULL") == 0

            assert await session.fetchval("SELECT pg_try_advisory_lock($1)", key)
            claimed = await claim_batch(conn, 10, fence)
            assert [e.position for e in claimed.envelopes] == [1, 2]
            assert await conn.fetchval("SELECT last_position FROM relay_state") == 2
    finally:
        await session.close()


async def test_shutdown_is_idempotent_and_releases_the_lock(relays: RelayHarness) -> None:
    relay = relays.make()
    task = relays.start(relay)
    await wait_until(lambda: relay.role is Role.ACTIVE, 10, "the relay to become active")
    assert await lock_holder_pid(relays.pool, relays.settings.relay_lock_key) is not None

    await asyncio.gather(relay.shutdown(), relay.shutdown())
    await relay.shutdown()
    assert task.done()
    assert relay.role is Role.STOPPED
    assert await lock_holder_pid(relays.pool, relays.settings.relay_lock_key) is None

    never_started = relays.make()
    await never_started.shutdown()
    await asyncio.wait_for(never_started.run(), 5)
    assert never_started.role is Role.STOPPED
    with pytest.raises(RuntimeError):
        await relay.run()


async def test_cancelling_run_propagates_and_releases_the_lock(relays: RelayHarness) -> None:
    relay = relays.make()
    task = asyncio.create_task(relay.run())
    await wait_until(lambda: relay.role is Role.ACTIVE, 10, "the relay to become active")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert relay.role is Role.STOPPED
    assert await lock_holder_pid(relays.pool, relays.settings.relay_lock_key) is None


async def test_recovers_when_postgres_drops_every_connection(
    relays: RelayHarness, database_url: str, published: ChannelRecorder[EventEnvelope]
) -> None:
    relay = relays.make()
    relays.start(relay)
    await wait_until(lambda: relay.role is Role.ACTIVE, 10, "the relay to become active")
    before = await insert_events(relays.pool, "a", 5)
    await published.wait_for(lambda m: len(m) >= 5)

    old_holder = await lock_holder_pid(relays.pool, relays.settings.relay_lock_key)

    # What a Postgres restart looks like from the relay: every session ends at once.
    admin = await asyncpg.connect(database_url)
    try:
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        assert killed >= 2
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while await lock_holder_pid(admin, relays.settings.relay_lock_key) in (None, old_holder):
            assert loop.time() < deadline, "the relay did not take the lock again"
            await asyncio.sleep(0.02)
    finally:
        await admin.close()
    await wait_until(lambda: relay.role is Role.ACTIVE, 10, "the relay to be active again")

    # A fresh pool: the shared one may still hand out a connection whose end it has not read yet.
    writers: asyncpg.Pool[Any] = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        after = await insert_events(writers, "a", 5)
    finally:
        await writers.close()
    await published.wait_for(lambda m: ids_of(before + after) <= {e.event_id for e in m})
    assert_gap_free(published.messages, ids_of(before + after))
