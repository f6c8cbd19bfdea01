"""Positions are gap-free and nothing is skipped when writers commit out of id order."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import asyncpg
import pytest

from relay.outbox import claim_batch
from relay.publisher import Publisher
from shared_kernel.contracts.event_log import NewEvent
from tessera.events.v1.envelope_pb2 import EventEnvelope, StreamHead
from tests.integration.relay.conftest import RelayHarness
from tests.integration.relay.support import (
    ChannelRecorder,
    assert_gap_free,
    event_ids,
    ids_of,
    insert_events,
    write_event,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def writers_pool(database_url: str) -> Any:
    """A separate, larger pool for writers, so held transactions never starve the relay."""
    pool: asyncpg.Pool[Any] = await asyncpg.create_pool(database_url, min_size=5, max_size=25)
    try:
        yield pool
    finally:
        await asyncio.wait_for(pool.close(), 10)


async def test_a_lower_id_committed_later_is_not_skipped(
    relays: RelayHarness, writers_pool: asyncpg.Pool[Any], published: ChannelRecorder[EventEnvelope]
) -> None:
    relay = relays.make()
    slow_conn = await writers_pool.acquire()
    try:
        slow_tx = slow_conn.transaction()
        await slow_tx.start()
        slow = await write_event(slow_conn, "slow")  # takes the lower id, stays uncommitted
        (fast,) = await insert_events(writers_pool, "fast", 1)

        assert await relay.run_once() == 1
        await slow_tx.commit()
        assert await relay.run_once() == 1
    finally:
        await writers_pool.release(slow_conn)

    await published.wait_for(lambda m: len(m) == 2)
    assert [(m.event_id, m.position) for m in published.messages] == [(str(fast.event_id), 1), (str(slow.event_id), 2)]
    ids = dict(await relays.pool.fetch("SELECT event_id::text, id FROM outbox"))
    assert ids[str(slow.event_id)] < ids[str(fast.event_id)]


async def test_concurrent_writers_with_interleaved_commits(
    relays: RelayHarness, writers_pool: asyncpg.Pool[Any], published: ChannelRecorder[EventEnvelope]
) -> None:
    # A small batch makes the relay claim many times while commits interleave.
    relays.start(relays.make(relay_batch_size=7))
    release_held = asyncio.Event()
    held_inserted = [asyncio.Event() for _ in range(3)]
    held_written: list[NewEvent] = []

    async def held_writer(index: int) -> NewEvent:
        # Inserts before everyone else (lowest ids) and commits after everyone else.
        async with writers_pool.acquire() as conn, conn.transaction():
            event = await write_event(conn, f"held-{index}")
            held_written.append(event)
            held_inserted[index].set()
            await release_held.wait()
        return event

    held_tasks = [asyncio.create_task(held_writer(i)) for i in range(len(held_inserted))]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in held_inserted)), 10)

    rng = random.Random(20240611)

    async def writer() -> list[NewEvent]:
        written = []
        for _ in range(15):
            async with writers_pool.acquire() as conn, conn.transaction():
                written.append(await write_event(conn, f"agg-{rng.randrange(5)}"))
                # Keep the transaction open a moment so commits land out of id order.
                await asyncio.sleep(rng.random() * 0.005)
        return written

    batches = await asyncio.gather(*(writer() for _ in range(20)))
    fast_ids = ids_of([e for batch in batches for e in batch])
    await published.wait_for(lambda m: fast_ids <= event_ids(m), what="the committed events")

    held_ids = ids_of(held_written)
    assert not (event_ids(published.messages) & held_ids), "an uncommitted event was published"
    release_held.set()
    await asyncio.gather(*held_tasks)
    expected = fast_ids | held_ids
    await published.wait_for(lambda m: expected <= event_ids(m), what="the held events")

    messages = published.messages
    assert_gap_free(messages, expected)
    assert [m.position for m in messages] == list(range(1, len(expected) + 1)), "published exactly once, in order"
    # The held rows had the lowest ids but committed last: they get the last positions.
    assert {m.event_id for m in messages[-len(held_ids) :]} == held_ids
    versions: dict[str, list[int]] = defaultdict(list)
    for message in messages:
        versions[message.aggregate_id].append(message.aggregate_version)
    for aggregate_id, seen in versions.items():
        assert seen == list(range(1, len(seen) + 1)), aggregate_id

    # The scenario did what it says: some rows were positioned out of id order.
    ids_in_position_order = [r["id"] for r in await relays.pool.fetch("SELECT id FROM outbox ORDER BY position")]
    assert ids_in_position_order != sorted(ids_in_position_order)

    state = await relays.pool.fetchrow(
        "SELECT count(*) FILTER (WHERE NOT coalesce(position <= published_position, false)) AS unpublished,"
        " max(position) AS head, max(last_position) AS last_position FROM outbox CROSS JOIN relay_state"
    )
    assert state is not None
    assert (state["unpublished"], state["head"], state["last_position"]) == (0, len(expected), len(expected))


async def test_a_backlog_drains_in_full_batches_in_id_order(
    relays: RelayHarness, published: ChannelRecorder[EventEnvelope]
) -> None:
    written = await insert_events(relays.pool, "backlog", 25)
    relay = relays.make(relay_batch_size=7)

    assert await relay.run_once() == 25
    assert await relay.run_once() == 0

    await published.wait_for(lambda m: len(m) == 25)
    assert [m.event_id for m in published.messages] == [str(e.event_id) for e in written]
    assert [m.position for m in published.messages] == list(range(1, 26))


class _BatchSizes:
    """Publishes through `inner`, recording how many envelopes each batch carried."""

    def __init__(self, inner: Publisher) -> None:
        self._inner = inner
        self.sizes: list[int] = []

    async def publish_events(self, envelopes: Sequence[EventEnvelope]) -> None:
        """Record the batch's size, then publish it."""
        self.sizes.append(len(envelopes))
        await self._inner.publish_events(envelopes)

    async def publish_head(self, head: StreamHead) -> None:
        """Delegate."""
        await self._inner.publish_head(head)


async def test_a_backlog_is_claimed_in_growing_batches_and_a_new_cycle_starts_small(
    relays: RelayHarness, published: ChannelRecorder[EventEnvelope]
) -> None:
    written = await insert_events(relays.pool, "backlog", 47)
    sizes = _BatchSizes(relays.real_publisher())
    relay = relays.make(publisher=sizes, relay_batch_size=4, relay_max_batch_size=16)

    assert await relay.run_once() == 47
    # Each full batch doubles the next, up to the largest size; a short one ends the cycle.
    assert sizes.sizes == [4, 8, 16, 16, 3]

    written += await insert_events(relays.pool, "later", 6)
    assert await relay.run_once() == 6
    assert sizes.sizes[5:] == [4, 2]

    await published.wait_for(lambda m: len(m) == 53)
    assert [m.event_id for m in published.messages] == [str(e.event_id) for e in written]
    assert [m.position for m in published.messages] == list(range(1, 54))


async def test_racing_claimers_hand_out_each_position_once(relays: RelayHarness, writers_pool: Any) -> None:
    """Two claimers at once (a deposed relay that does not know it yet, and its successor) never share a position."""
    total = 120
    writes_done = asyncio.Event()

    async def write() -> None:
        for i in range(total):
            async with writers_pool.acquire() as conn, conn.transaction():
                await write_event(conn, f"racer-{i % 7}")
        writes_done.set()

    async def claim() -> list[EventEnvelope]:
        claimed: list[EventEnvelope] = []
        async with relays.pool.acquire() as conn:
            while True:
                batch = (await claim_batch(conn, 5, None)).envelopes
                claimed.extend(batch)
                if not batch and writes_done.is_set():
                    return claimed

    _, first, second = await asyncio.wait_for(asyncio.gather(write(), claim(), claim()), 60)

    positions = sorted(e.position for e in [*first, *second])
    assert positions == list(range(1, total + 1))
    assert len({e.event_id for e in [*first, *second]}) == total
    by_aggregate: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for e in sorted([*first, *second], key=lambda e: e.position):
        by_aggregate[e.aggregate_id].append((e.position, e.aggregate_version))
    for events in by_aggregate.values():
        assert [version for _, version in events] == list(range(1, len(events) + 1))
    assert await relays.pool.fetchval("SELECT last_position FROM relay_state") == total
    assert await relays.pool.fetchval("SELECT count(*) FROM outbox WHERE position IS NULL") == 0
