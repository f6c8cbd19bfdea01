"""A crash anywhere between claiming and marking may re-publish an event, never lose one."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from relay.outbox import claim_batch
from tessera.events.v1.envelope_pb2 import EventEnvelope
from tests.integration.relay.conftest import RelayHarness
from tests.integration.relay.support import (
    ChannelRecorder,
    FailingPublisher,
    HangingPublisher,
    PublishThenCrash,
    assert_gap_free,
    ids_of,
    insert_events,
    write_event,
)

pytestmark = pytest.mark.integration


async def _positions(relays: RelayHarness) -> dict[str, tuple[int | None, bool]]:
    rows = await relays.pool.fetch(
        "SELECT event_id::text, position,"
        " coalesce(position <= (SELECT published_position FROM relay_state), false) AS done FROM outbox"
    )
    return {r["event_id"]: (r["position"], r["done"]) for r in rows}


async def test_redis_down_after_claim_then_restart(
    relays: RelayHarness, published: ChannelRecorder[EventEnvelope]
) -> None:
    written = await insert_events(relays.pool, "a", 10)
    # Nothing listens on port 1: every publish fails like a Redis outage.
    dead_redis = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    try:
        crashed = relays.make(redis=dead_redis, relay_batch_size=4)
        with pytest.raises(redis.exceptions.ConnectionError):
            await crashed.run_once()
        # The failed batch and the one claimed while it was being published; a retry
        # publishes those first and positions nothing new while Redis stays down.
        with pytest.raises(redis.exceptions.ConnectionError):
            await crashed.run_once()
    finally:
        await dead_redis.aclose()

    before = await _positions(relays)
    positioned = {e: p for e, (p, done) in before.items() if p is not None}
    assert sorted(positioned.values()) == list(range(1, 9))
    assert not any(done for _, done in before.values())

    restarted = relays.make(relay_batch_size=4)
    assert await restarted.run_once() == 10
    await published.wait_for(lambda m: len(m) == 10)
    by_position = assert_gap_free(published.messages, ids_of(written))
    assert all(by_position[p] == e for e, p in positioned.items()), "re-published at the same positions"
    assert all(done for _, done in (await _positions(relays)).values())


async def test_crash_after_publish_before_mark(relays: RelayHarness, published: ChannelRecorder[EventEnvelope]) -> None:
    written = await insert_events(relays.pool, "a", 6)
    crashing = relays.make(publisher=PublishThenCrash(relays.real_publisher()), relay_batch_size=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        await crashing.run_once()
    before = await _positions(relays)

    assert await relays.make(relay_batch_size=4).run_once() == 6
    # Positions 1-4 went out twice (duplicates are allowed); 5-6 once; none is missing.
    await published.wait_for(lambda m: len(m) == 10)
    by_position = assert_gap_free(published.messages, ids_of(written))
    assert [m.position for m in published.messages] == [1, 2, 3, 4, 1, 2, 3, 4, 5, 6]
    assert all(by_position[p] == e for e, (p, _) in before.items() if p is not None)


async def test_cancelled_while_publishing(relays: RelayHarness, published: ChannelRecorder[EventEnvelope]) -> None:
    written = await insert_events(relays.pool, "a", 5)
    hanging = HangingPublisher(relays.real_publisher())
    relay = relays.make(publisher=hanging)
    task = asyncio.create_task(relay.run_once())
    await asyncio.wait_for(hanging.entered.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert hanging.cancelled.is_set()
    before = await _positions(relays)
    assert sorted(p or 0 for p, _ in before.values()) == [1, 2, 3, 4, 5], "positions were committed before publishing"

    assert await relays.make().run_once() == 5
    await published.wait_for(lambda m: len(m) == 5)
    by_position = assert_gap_free(published.messages, ids_of(written))
    assert all(by_position[p] == e for e, (p, _) in before.items() if p is not None)


async def test_running_relay_retries_until_redis_is_back(
    relays: RelayHarness, published: ChannelRecorder[EventEnvelope], caplog: pytest.LogCaptureFixture
) -> None:
    flaky = FailingPublisher(relays.real_publisher(), failures=3, error=redis.exceptions.ConnectionError("down"))
    relays.start(relays.make(publisher=flaky, relay_batch_size=4))
    first = await insert_events(relays.pool, "a", 3)
    await published.wait_for(lambda m: len(m) >= 3, what="the first events after the outage")
    second = await insert_events(relays.pool, "a", 9)

    await published.wait_for(lambda m: len(m) >= 12)
    assert_gap_free(published.messages, ids_of(first + second))
    assert [m.position for m in published.messages] == list(range(1, 13))
    assert flaky.failures_left == 0
    assert any(r.levelname == "WARNING" and "relay cycle failed" in r.getMessage() for r in caplog.records)


async def test_rows_a_deposed_relay_positioned_but_never_published_go_out(
    relays: RelayHarness, published: ChannelRecorder[EventEnvelope]
) -> None:
    """The active relay looks for stranded rows on its own schedule, not only after its own failures."""
    relay = relays.make()
    relays.start(relay)
    first = await insert_events(relays.pool, "a", 3)
    await published.wait_for(lambda m: len(m) >= 3)

    # A relay that lost the lock without knowing positions rows (its claim committed just
    # after the active one's first look) and dies before publishing them.
    async with relays.pool.acquire() as conn, conn.transaction():
        stranded = [await write_event(conn, "b") for _ in range(2)]
        assert [e.position for e in (await claim_batch(conn, 10, None)).envelopes] == [4, 5]

    await published.wait_for(lambda m: len(m) >= 5)
    assert_gap_free(published.messages, ids_of([*first, *stranded]))
