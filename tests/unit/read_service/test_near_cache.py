"""The near cache stays exact when reads and invalidations interleave (interleavings forced with events)."""

from __future__ import annotations

import asyncio

import pytest

from read_service.near_cache import NearCache


class Store:
    """A stand-in for Redis: a dict, and reads that can be held mid-flight."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.reads = 0
        self.hold: asyncio.Event | None = None
        self.reading = asyncio.Event()

    async def read(self, key: str) -> str | None:
        self.reads += 1
        value = self.values.get(key)
        self.reading.set()
        if self.hold is not None:
            await self.hold.wait()
        return value


async def query(cache: NearCache, store: Store, key: str, checkpoint: int, deps: tuple[str, ...] = ()) -> str | None:
    """What a query does: read (observe) the checkpoint, then the view through the cache."""

    async def read_checkpoint() -> int:
        return checkpoint

    await cache.observe(read_checkpoint)()
    return await cache.get((key, *deps), lambda: store.read(key))


async def in_task(cache: NearCache, store: Store, key: str, checkpoint: int) -> str | None:
    # Each query runs in its own task, as gRPC runs each call: the observed checkpoint is per task.
    return await asyncio.create_task(query(cache, store, key, checkpoint))


async def test_hits_after_the_first_read_and_counts_them() -> None:
    cache = NearCache("users", 10)
    cache.reset(5)
    store = Store()
    store.values["u1"] = "v1"
    assert await in_task(cache, store, "u1", 5) == "v1"
    assert await in_task(cache, store, "u1", 5) == "v1"
    assert await in_task(cache, store, "u1", 5) == "v1"
    assert store.reads == 1
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (2, 1)
    assert stats.hit_ratio == pytest.approx(2 / 3)


async def test_an_invalidation_during_a_read_keeps_the_old_value_out() -> None:
    cache = NearCache("users", 10)
    cache.reset(5)
    store = Store()
    store.values["u1"] = "old"
    store.hold = asyncio.Event()
    # The read starts, reads "old" from the store and is held before it can store it.
    reader = asyncio.create_task(query(cache, store, "u1", 5))
    await store.reading.wait()
    # Meanwhile event 6 writes the key and the feed invalidates it.
    store.values["u1"] = "new"
    cache.invalidate(["u1"])
    cache.advance(6)
    store.hold.set()
    assert await reader == "old"  # what Redis said at position 5: right for that query
    store.hold = None
    # Nothing old was stored: the next query (at checkpoint 6) reads the new value.
    assert await in_task(cache, store, "u1", 6) == "new"
    assert await in_task(cache, store, "u1", 6) == "new"
    assert store.reads == 2


async def test_a_reset_during_a_read_keeps_the_value_out() -> None:
    cache = NearCache("users", 10)
    cache.reset(5)
    store = Store()
    store.values["u1"] = "old"
    store.hold = asyncio.Event()
    reader = asyncio.create_task(query(cache, store, "u1", 5))
    await store.reading.wait()
    store.values["u1"] = "rebuilt"
    cache.reset(9)
    store.hold.set()
    await reader
    store.hold = None
    assert await in_task(cache, store, "u1", 9) == "rebuilt"


async def test_no_hit_while_the_feed_is_behind_the_reported_checkpoint() -> None:
    cache = NearCache("users", 10)
    cache.reset(5)
    store = Store()
    store.values["u1"] = "v5"
    assert await in_task(cache, store, "u1", 5) == "v5"
    # Another replica applied event 6 (writing u1): a query reports checkpoint 6 before this
    # replica's feed has seen it, so the cached value must not be served.
    store.values["u1"] = "v6"
    assert await in_task(cache, store, "u1", 6) == "v6"
    assert cache.stats().behind == 1
    # The feed catches up: event 6 invalidates u1.
    cache.invalidate(["u1"])
    cache.advance(6)
    assert await in_task(cache, store, "u1", 6) == "v6"
    assert await in_task(cache, store, "u1", 6) == "v6"


async def test_a_write_to_a_dependent_key_drops_the_entry() -> None:
    cache = NearCache("users", 10)
    cache.reset(1)
    store = Store()
    store.values["view:u1"] = "spent 0"
    assert await asyncio.create_task(query(cache, store, "view:u1", 1, deps=("spent:u1",))) == "spent 0"
    store.values["view:u1"] = "spent 5"
    cache.invalidate(["spent:u1"])
    cache.advance(2)
    assert await asyncio.create_task(query(cache, store, "view:u1", 2, deps=("spent:u1",))) == "spent 5"


async def test_least_recently_used_goes_first() -> None:
    cache = NearCache("users", 2)
    cache.reset(1)
    store = Store()
    store.values.update({"a": "A", "b": "B", "c": "C"})
    for key in ("a", "b", "a", "c"):
        await in_task(cache, store, key, 1)
    assert cache.stats().size == 2
    reads = store.reads
    await in_task(cache, store, "a", 1)  # still cached
    assert store.reads == reads
    await in_task(cache, store, "b", 1)  # evicted
    assert store.reads == reads + 1


async def test_off_reads_every_time_and_reads_without_a_checkpoint_bypass() -> None:
    store = Store()
    store.values["a"] = "A"
    off = NearCache("users", 0)
    off.reset(1)
    await in_task(off, store, "a", 1)
    await in_task(off, store, "a", 1)
    assert store.reads == 2
    cache = NearCache("users", 4)
    cache.reset(1)
    # No checkpoint observed in this task (a consistency-token wait, say): never a hit.
    await cache.get(("a",), lambda: store.read("a"))
    await cache.get(("a",), lambda: store.read("a"))
    assert store.reads == 4
