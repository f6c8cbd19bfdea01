"""An optional in-process cache of single views in front of Redis, kept exact by the event stream.

Hot keys (one user, product or order read over and over) cost a Redis round trip per query.
`NearCache` keeps the last value read for up to `capacity` keys (least recently used out
first) and drops a key as soon as the change feed (read_service.watch) has seen an event
write it. Two rules keep it exact:

- A value is stored only when no invalidation of its keys happened while it was being read.
  Each key being read has an epoch; an invalidation bumps it (and a reset bumps a global
  epoch), and a read that finds another epoch when it ends does not store what it read: it
  may be the value from before the write.
- A hit is served only when the feed has applied invalidations at least up to the checkpoint
  the query reports (`view_position`). A single-view query (`peek`) reports its projector's
  in-memory checkpoint and makes no Redis call at all; other queries report the checkpoint
  read from Redis just before the read (`get`). A miss reads the checkpoint as the first
  key of its own read (`fill`), and a value read that way is stored under the same
  epoch rule. Otherwise the query reads Redis, so a reply is never older than the position
  it states.
- Losing the key space (the projector stops serving: Redis lost data, a rebuild; or it
  switches generation) makes the cache `forget` every entry at once, before any query can be
  answered again.

The query path tells the cache that checkpoint through `observe` (a wrapper around the
checkpoint read, which stores it in a context variable of the query's task).

Hits, misses and the hit ratio are exposed with `stats()`, as OpenTelemetry observable
instruments (`tessera.read.near_cache.*`, labelled by view) and in a periodic log line.
"""

from __future__ import annotations

import collections
import contextvars
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from opentelemetry import metrics

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters of one cache since start."""

    name: str
    capacity: int
    size: int
    hits: int
    misses: int
    # Lookups that could not be served from memory because the feed had not reached the
    # query's checkpoint yet (counted in `misses` too).
    behind: int
    invalidations: int
    resets: int

    @property
    def hit_ratio(self) -> float:
        """Hits over lookups (0.0 before the first lookup)."""
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


class NearCache:
    """An exact LRU cache of one projection's single views; see the module docstring."""

    def __init__(self, name: str, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("capacity must not be negative")
        self.name = name
        self.capacity = capacity
        self._entries: collections.OrderedDict[str, tuple[Any, tuple[str, ...]]] = collections.OrderedDict()
        # Every other Redis key an entry depends on -> the entry's key.
        self._owners: dict[str, str] = {}
        # Keys being read now -> [epoch, readers].
        self._inflight: dict[str, list[int]] = {}
        self._epoch = 0
        # Every write at or before this position has been applied to the cache (None: not yet known).
        self._through: int | None = None
        self._reported: contextvars.ContextVar[int | None] = contextvars.ContextVar(f"near_cache_{name}", default=None)
        self._hits = 0
        self._misses = 0
        self._behind = 0
        self._invalidations = 0
        self._resets = 0

    @property
    def enabled(self) -> bool:
        """False when the capacity is 0: every read goes to Redis."""
        return self.capacity > 0

    @property
    def holds_anything(self) -> bool:
        """True when an entry or a read under way could depend on a key: only then can `invalidate` matter."""
        return bool(self._entries) or bool(self._inflight)

    @property
    def through(self) -> int | None:
        """The position up to which invalidations have been applied (None before the first reset)."""
        return self._through

    # -- the query side ---------------------------------------------------------------------

    def observe(self, read: Callable[[], Awaitable[int]]) -> ObservedCheckpoint:
        """Wrap a checkpoint read so that the reads that follow it in the same task know it.

        A read that can report the loss of its key space (a projector's CheckpointReader) is
        told to make this cache `forget` everything then.
        """
        on_loss = getattr(read, "on_loss", None)
        if callable(on_loss):
            on_loss(self.forget)
        return ObservedCheckpoint(self, read)

    def report(self, checkpoint: int) -> None:
        """Tell the reads that follow in this task the checkpoint the query reports."""
        self._reported.set(checkpoint)

    def peek(self, key: str, position: int) -> tuple[Any] | None:
        """`(value,)` of `key` from memory when every write up to `position` has been applied; else None.

        No checkpoint read at all: the caller states the position it will report (its projector's
        checkpoint, which a consistency-token wait has already brought to the token's position),
        and an entry exact through `self.through` >= `position` reflects at least that position.
        """
        through = self._through
        entry = self._entries.get(key)
        if entry is None or through is None:
            return None
        if through < position:
            self._behind += 1
            return None
        self._entries.move_to_end(key)
        self._hits += 1
        return (entry[0],)

    async def get(self, keys: Sequence[str], load: Callable[[], Awaitable[T]]) -> T:
        """The value `load` reads from `keys` (the first names the entry), from memory when exact."""
        if not self.enabled:
            return await load()
        key = keys[0]
        floor = self._reported.get()
        entry = self._entries.get(key)
        if floor is not None and self._through is not None and self._through >= floor:
            if entry is not None:
                self._entries.move_to_end(key)
                self._hits += 1
                value: T = entry[0]
                return value
        elif entry is not None:
            self._behind += 1
        self._misses += 1
        loaded: T = await self._load(keys, load)
        return loaded

    async def fill(self, keys: Sequence[str], load: Callable[[], Awaitable[tuple[T, int]]]) -> tuple[T, int]:
        """A miss by choice: run `load` (value and checkpoint read together) and keep the value when exact."""
        if not self.enabled:
            return await load()
        self._misses += 1
        value, checkpoint = await self._load(keys, load, first=True)
        return value, checkpoint

    async def _load(self, keys: Sequence[str], load: Callable[[], Awaitable[Any]], first: bool = False) -> Any:
        # first: `load` answers a pair and only its first item is the entry's value.
        epoch = self._epoch
        marks = self._begin(keys)
        stored = False
        try:
            result = await load()
            stored = self._end(keys, marks, epoch)
        finally:
            if not stored:
                self._release(keys)
        if stored:
            self._store(keys[0], tuple(keys), result[0] if first else result)
        return result

    def _begin(self, keys: Sequence[str]) -> list[int]:
        marks = []
        for key in keys:
            record = self._inflight.setdefault(key, [0, 0])
            record[1] += 1
            marks.append(record[0])
        return marks

    def _end(self, keys: Sequence[str], marks: list[int], epoch: int) -> bool:
        """Whether the value read may be stored (no invalidation meanwhile); releases the keys when so."""
        valid = epoch == self._epoch and all(self._inflight[k][0] == m for k, m in zip(keys, marks, strict=True))
        if valid:
            self._release(keys)
        return valid

    def _release(self, keys: Sequence[str]) -> None:
        for key in keys:
            record = self._inflight.get(key)
            if record is None:
                continue
            record[1] -= 1
            if record[1] <= 0:
                del self._inflight[key]

    def _store(self, key: str, keys: tuple[str, ...], value: Any) -> None:
        self._drop(key)
        self._entries[key] = (value, keys)
        for other in keys[1:]:
            self._owners[other] = key
        while len(self._entries) > self.capacity:
            oldest, _ = next(iter(self._entries.items()))
            self._drop(oldest)

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        for other in entry[1][1:]:
            if self._owners.get(other) == key:
                del self._owners[other]

    # -- the feed side ------------------------------------------------------------------------

    def invalidate(self, keys: Iterable[str]) -> None:
        """Forget the entries that depend on `keys` and spoil reads of them that are under way."""
        for key in keys:
            record = self._inflight.get(key)
            if record is not None:
                record[0] += 1
            owner = self._owners.get(key, key)
            if owner in self._entries:
                self._invalidations += 1
                self._drop(owner)

    def advance(self, position: int) -> None:
        """Every write up to `position` has been passed to `invalidate`."""
        if self._through is not None and position > self._through:
            self._through = position

    def forget(self) -> None:
        """Forget every entry and spoil reads under way: the key space was lost or replaced.

        The projector calls it (through its checkpoint reader) the moment it stops serving or
        switches key space, so nothing read before is served after, whenever the feed notices.
        `through` stays: no query reads (or fills) until the projector serves again, caught up
        past every position the feed had applied, and the feed resets the cache when it sees
        the switch or the loss.
        """
        self._entries.clear()
        self._owners.clear()
        self._epoch += 1
        self._resets += 1

    def reset(self, position: int | None) -> None:
        """Forget everything (Redis may hold anything now); writes up to `position` are reflected."""
        self._entries.clear()
        self._owners.clear()
        self._epoch += 1
        self._through = position
        self._resets += 1

    # -- reporting ----------------------------------------------------------------------------

    def stats(self) -> CacheStats:
        """The counters since start."""
        return CacheStats(
            name=self.name,
            capacity=self.capacity,
            size=len(self._entries),
            hits=self._hits,
            misses=self._misses,
            behind=self._behind,
            invalidations=self._invalidations,
            resets=self._resets,
        )


class ObservedCheckpoint:
    """A checkpoint read wrapped by `NearCache.observe`: calling it reads and reports the checkpoint."""

    def __init__(self, cache: NearCache, read: Callable[[], Awaitable[int]]) -> None:
        self.cache = cache
        self.read = read

    async def __call__(self) -> int:
        """Read the checkpoint and report it to the cache for the reads that follow in this task."""
        checkpoint = await self.read()
        self.cache.report(checkpoint)
        return checkpoint


def register_metrics(caches: Sequence[NearCache]) -> None:
    """Expose the caches' counters and hit ratios through the OpenTelemetry metrics API."""
    meter = metrics.get_meter("tessera.read_service.near_cache")

    def counter(field: str) -> Callable[[metrics.CallbackOptions], Iterable[metrics.Observation]]:
        def observe(_options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
            return [metrics.Observation(getattr(c.stats(), field), {"view": c.name}) for c in caches]

        return observe

    meter.create_observable_counter("tessera.read.near_cache.hits", [counter("hits")], description="Near cache hits")
    meter.create_observable_counter(
        "tessera.read.near_cache.misses", [counter("misses")], description="Near cache misses (reads from Redis)"
    )
    meter.create_observable_gauge(
        "tessera.read.near_cache.hit_ratio", [counter("hit_ratio")], description="Hits over lookups since start"
    )


def log_stats(caches: Sequence[NearCache]) -> None:
    """One log line per enabled cache with its hit ratio."""
    for cache in caches:
        if not cache.enabled:
            continue
        stats = cache.stats()
        logger.info(
            "near cache %s: hit ratio %.3f (%s hits, %s misses, %s entries)",
            stats.name,
            stats.hit_ratio,
            stats.hits,
            stats.misses,
            stats.size,
            extra={
                "near_cache": stats.name,
                "hit_ratio": round(stats.hit_ratio, 4),
                "hits": stats.hits,
                "misses": stats.misses,
                "entries": stats.size,
                "behind": stats.behind,
            },
        )


def view_caches(names: Sequence[str], capacity: int) -> dict[str, NearCache]:
    """One cache per view type, all of `capacity` entries, with their metrics registered."""
    caches = {name: NearCache(name, capacity) for name in names}
    register_metrics(list(caches.values()))
    return caches
