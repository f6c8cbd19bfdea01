"""Watch streams and near-cache invalidation, fed by one projection's change feed.

`ChangeFeed` turns the projector's work into an ordered stream of view changes. The
projector hands it every event with the effect it computed (Projector.effect_listeners),
before the effect is written; the feed keeps it pending and *releases* it once the
checkpoint has reached its position, so a change is never announced before Redis holds it.
Releasing walks the positions one by one, in order, each exactly once:

- a position with a pending effect: its written keys are invalidated in the near caches,
  and the new values of the watched keys go to their watches;
- a position without one (another replica sharing the views applied it, or the feed fell
  behind and dropped its pending effects): the event is read from the Postgres event log
  and projected again, from the values the feed keeps of the watched keys (`tracked`, exact
  at the released position; other keys count as absent, see `_replay`). The near caches
  forget everything then, because only the replayed effect's keys are known. While no
  watch is open the event is not read at all: forgetting is all that is left to do.

A watch starts by reading its keys and the checkpoint in one MULTI from Redis; the feed
first releases up to that checkpoint, so the first message is exact at that position and
every later change has a higher one: no gap, no duplicate, across the projector's own
catch-up (whose events come with their effects too) and reconnects.

A watch that resumes (`after_position` on the request: the last position its caller received)
starts the same way, but instead of the current values it sends what changed after that
position: the feed replays the log from the first event of the watched aggregates up to the
checkpoint it opened at, with the same replay path as above (each event projected again from
the values the replay keeps), and sends the changes above `after`; then it goes on live from
the checkpoint. A resume point ahead of this replica's checkpoint needs no waiting: the live
changes up to it are dropped, so the first message is still the first change after it.

Each watch has a bounded queue (WATCH_QUEUE_MAX): a watcher that does not read is ended
with RESOURCE_EXHAUSTED instead of growing memory. When the projector stops being ready
(Redis lost its data, a rebuild is under way) or switches key space, every watch ends with
UNAVAILABLE, since the feed can no longer vouch for continuity; closing the feed (server
shutdown) ends them cleanly.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg
import redis.asyncio as aioredis

from read_service.applier import handles, project_run
from read_service.consistency import ORDER_AGGREGATE
from read_service.keys import OrderKeys, member_id
from read_service.near_cache import NearCache, log_stats
from read_service.projections.base import Effect, Op, Projection
from read_service.sequences import sequence_of
from shared_kernel.contracts import errors
from shared_kernel.contracts.event_log import first_positions, head_position, read_positioned
from tessera.events.v1.envelope_pb2 import EventEnvelope
from tessera.orders.v1.order_query_service_pb2 import OrderView

logger = logging.getLogger(__name__)


async def _passed(_envelope: EventEnvelope, _exc: BaseException) -> bool:
    """A replayed event the projection raises on changed nothing: an operator skipped it, or it parked its aggregate."""
    return True


# How often the feed looks at the projector's readiness when no checkpoint moves.
RECHECK_S = 0.25
# Effects waiting for their checkpoint beyond which the feed drops them and replays from the log.
PENDING_MAX = 100_000
# Attempts at reading a customer's orders and their views at one checkpoint.
SNAPSHOT_ATTEMPTS = 10


class ProjectorView(Protocol):
    """What the feed needs to know of the projector."""

    @property
    def ready(self) -> bool:
        """Whether the views have caught up with the event log."""

    @property
    def checkpoint(self) -> int:
        """The last checkpoint the projector saw."""

    @property
    def generation(self) -> str | None:
        """The key space the projector writes."""

    def changed(self) -> asyncio.Event:
        """Set the next time the checkpoint moves."""


@dataclass(frozen=True, slots=True)
class Change:
    """The value of one view key at one position (None: the key does not exist there)."""

    key: str
    value: bytes | None
    position: int


@dataclass(frozen=True, slots=True)
class Resume:
    """Where a resumed watch starts: after `after`; `aggregate_of` names the aggregate behind a watched key."""

    after: int
    aggregate_type: str
    aggregate_of: Callable[[str], str]


# Whether a command name is DEL, by name: a handful of names, each looked at once per process
# instead of once per op of every event applied.
_IS_DEL: dict[object, bool] = {}


def written_keys(ops: Iterable[Op]) -> list[str]:
    """The keys an effect's ops write (every argument of DEL, the first of any other command)."""
    keys: list[str] = []
    for op in ops:
        if not op or len(op) < 2:
            continue
        command = op[0]
        is_del = _IS_DEL.get(command)
        if is_del is None:
            is_del = _IS_DEL[command] = str(command).upper() == "DEL"
        for name in op[1:] if is_del else op[1:2]:
            keys.append(name if type(name) is str else name.decode() if isinstance(name, bytes) else str(name))
    return keys


@contextlib.contextmanager
def _muted(projection: object) -> Iterator[None]:
    """Silence the loggers of a projection's package while it projects an event again."""
    package = type(projection).__module__.rpartition(".")[0] or type(projection).__module__
    loggers = [
        logging.getLogger(name)
        for name in list(logging.root.manager.loggerDict)
        if name == package or name.startswith(package + ".")
    ]
    previous = [(each, each.disabled) for each in loggers]
    for each in loggers:
        each.disabled = True
    try:
        yield
    finally:
        for each, disabled in previous:
            each.disabled = disabled


class WatchLimiter:
    """The most watches one process serves at once."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.active = 0

    def acquire(self) -> None:
        """Take a slot; ResourceExhausted when none is free."""
        if self.active >= self.maximum:
            raise errors.ResourceExhausted(
                f"this replica serves at most {self.maximum} watches at once (WATCH_MAX_STREAMS); "
                "retry later or on another replica"
            )
        self.active += 1

    def release(self) -> None:
        """Give a slot back."""
        self.active = max(0, self.active - 1)


Matcher = Callable[[str, bytes | None], bool]


def _as_bytes(value: bytes | str | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


class Watch:
    """One open watch: the values it started from, then a bounded queue of changes."""

    def __init__(self, keys: Iterable[str], queue_max: int, match: Matcher | None = None) -> None:
        self.keys: set[str] = set(keys)
        self.match = match
        self.initial: dict[str, bytes | None] = {}
        self.position = 0
        self._queue_max = queue_max
        self._items: collections.deque[Change] = collections.deque()
        self._wake = asyncio.Event()
        self._closed = False
        self._error: errors.DomainError | None = None

    @property
    def closed(self) -> bool:
        """True once ended (cleanly or with an error)."""
        return self._closed

    def offer(self, change: Change) -> None:
        """Queue a change; a full queue ends the watch with ResourceExhausted."""
        if self._closed:
            return
        if len(self._items) >= self._queue_max:
            self.end(
                errors.ResourceExhausted(
                    f"the watcher fell {self._queue_max} changes behind (WATCH_QUEUE_MAX); re-open the watch"
                )
            )
            return
        self._items.append(change)
        self._wake.set()

    def end(self, error: errors.DomainError | None = None) -> None:
        """End the watch: cleanly (None) or with `error`, dropping what is queued when it is an error."""
        if self._closed:
            return
        self._closed = True
        self._error = error
        if error is not None:
            self._items.clear()
        self._wake.set()

    async def changes(self) -> AsyncIterator[Change]:
        """The queued changes, in order; raises the error the watch ended with."""
        while True:
            if self._items:
                yield self._items.popleft()
                continue
            if self._closed:
                if self._error is not None:
                    raise self._error
                return
            self._wake.clear()
            await self._wake.wait()


class ChangeFeed:
    """Releases one projection's effects in position order to watches and near caches."""

    def __init__(
        self,
        projector: ProjectorView,
        projection: Projection,
        client: aioredis.Redis,
        pool: asyncpg.Pool[Any],
        *,
        caches: Sequence[NearCache] = (),
        queue_max: int = 1000,
        batch_size: int = 1000,
        pending_max: int = PENDING_MAX,
        recheck_s: float = RECHECK_S,
        stats_interval_s: float = 60.0,
    ) -> None:
        self._projector = projector
        self._projection = projection
        self._client = client
        self._pool = pool
        self._caches = tuple(caches)
        self._queue_max = queue_max
        self._batch_size = batch_size
        self._pending_max = pending_max
        self._recheck_s = recheck_s
        self._stats_interval_s = stats_interval_s
        self._pending: dict[int, tuple[EventEnvelope, Effect]] = {}
        # The position up to which every change has been released (None: not serving).
        self._released: int | None = None
        self._generation: str | None = None
        self._tracked: dict[str, bytes | None] = {}
        self._by_key: dict[str, set[Watch]] = {}
        self._matchers: set[Watch] = set()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.replayed = 0

    # -- life cycle -------------------------------------------------------------------------

    def on_effect(self, envelope: EventEnvelope, effect: Effect) -> None:
        """The projector's listener: keep the effect until the checkpoint reaches it."""
        if self._released is not None and envelope.position <= self._released:
            return
        if len(self._pending) >= self._pending_max:
            # Far behind: the log has every event, so drop them and replay instead of growing.
            self._pending.clear()
        self._pending[envelope.position] = (envelope, effect)

    def on_resolved(self, keys: Sequence[str] | None) -> None:
        """The projector's listener for an operator's retry or skip: `keys` changed without a new position.

        The near caches forget them; the watches of them end with UNAVAILABLE (re-opened, they
        start from the settled values), since no position orders that change among the others.
        None (another process settled it, the keys are unknown here): every watch ends and the
        caches forget everything.
        """
        if keys is None:
            if self._released is not None:
                self._reset(self._released, errors.Unavailable("a parked aggregate was settled; re-open the watch"))
            return
        for cache in self._caches:
            cache.invalidate(keys)
        error = errors.Unavailable("a parked aggregate of this view was settled by an operator; re-open the watch")
        for key in keys:
            for watch in list(self._by_key.get(key, ())):
                watch.end(error)
                self.close_watch(watch)

    def start(self) -> asyncio.Task[None]:
        """Run the feed in a task of the running loop (once)."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="change-feed")
        return self._task

    async def close(self) -> None:
        """End every watch cleanly and stop the feed."""
        self._closed = True
        for watch in list(self._all_watches()):
            watch.end()
        self._by_key.clear()
        self._matchers.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        log_stats(self._caches)

    @property
    def released(self) -> int | None:
        """The position up to which changes have been released (None while not serving)."""
        return self._released

    @property
    def open_watches(self) -> int:
        """Watches open on this feed."""
        return len(set(self._all_watches()))

    async def run(self) -> None:
        """Release changes as the checkpoint moves, until cancelled."""
        next_stats = time.monotonic() + self._stats_interval_s
        while True:
            changed = self._projector.changed()
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("change feed failed: %s: %s; starting over", type(exc).__name__, exc)
                self._reset(None, errors.Unavailable("the replica lost track of changes; re-open the watch"))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._recheck_s):
                    await changed.wait()
            if time.monotonic() >= next_stats:
                next_stats = time.monotonic() + self._stats_interval_s
                log_stats(self._caches)

    async def step(self) -> None:
        """Bring the feed to the projector's checkpoint (or reset it); run() calls it on every move."""
        async with self._lock:
            await self._sync()

    async def _sync(self) -> None:
        """Follow the projector: reset when it stopped serving or switched key space, else release."""
        projector = self._projector
        if not projector.ready:
            if self._released is not None:
                self._reset(
                    None, errors.Unavailable("the replica stopped serving (its views are being rebuilt); retry")
                )
            return
        if self._released is None or projector.generation != self._generation:
            if self._released is not None:
                logger.info("key space switched to %s; ending watches", projector.generation)
            self._reset(
                projector.checkpoint,
                errors.Unavailable("the replica switched to a rebuilt key space; re-open the watch"),
            )
            self._generation = projector.generation
            return
        target = projector.checkpoint
        if target < self._released:
            self._reset(None, errors.Unavailable("the replica's views went back; retry"))
            return
        if target > self._released:
            await self._release_to(target)

    # -- watches ------------------------------------------------------------------------------

    async def open(self, keys: Sequence[str]) -> Watch:
        """A watch of `keys`, with their values at one position (`initial`, `position`)."""
        async with self._lock:
            await self._sync()
            self._require_serving()
            checkpoint, values = await self._read(keys)
            watch = Watch(keys, self._queue_max)
            await self._register(watch, checkpoint, dict(zip(keys, values, strict=True)))
            return watch

    async def open_matching(self, index_key: str, key_of: Callable[[bytes], str], match: Matcher) -> Watch:
        """A watch of the keys an index lists now, and of every key whose new value `match` accepts."""
        async with self._lock:
            await self._sync()
            self._require_serving()
            for _ in range(SNAPSHOT_ATTEMPTS):
                async with self._client.pipeline(transaction=True) as pipe:
                    pipe.get(self._projection.checkpoint_key)
                    pipe.zrange(index_key, 0, -1, desc=True)
                    raw_checkpoint, members = await pipe.execute()
                keys = [key_of(m if isinstance(m, bytes) else m.encode()) for m in members]
                checkpoint, values = await self._read(keys)
                if checkpoint == int(raw_checkpoint or 0):
                    watch = Watch(keys, self._queue_max, match)
                    await self._register(watch, checkpoint, dict(zip(keys, values, strict=True)))
                    return watch
            raise errors.Unavailable("the views kept changing while the watch started; retry")

    def watches(self, limiter: WatchLimiter) -> Watches:
        """The streams of this feed, within `limiter`."""
        return Watches(self, limiter)

    def close_watch(self, watch: Watch) -> None:
        """Stop feeding `watch` (its caller is done with it)."""
        watch.end()
        self._matchers.discard(watch)
        for key in list(watch.keys):
            self._untrack(watch, key)

    def _require_serving(self) -> None:
        if self._closed:
            raise errors.Unavailable("the replica is shutting down; retry on another replica")
        if self._released is None or not self._projector.ready:
            raise errors.Unavailable("the read model is catching up with the event log; retry shortly")

    async def _read(self, keys: Sequence[str]) -> tuple[int, list[bytes | None]]:
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.get(self._projection.checkpoint_key)
            if keys:
                pipe.mget(list(keys))
            replies = await pipe.execute()
        values = [_as_bytes(v) for v in replies[1]] if keys else []
        return int(replies[0] or 0), values

    async def _register(self, watch: Watch, checkpoint: int, values: dict[str, bytes | None]) -> None:
        assert self._released is not None
        if checkpoint < self._released:
            raise errors.Unavailable("the replica's views went back; retry")
        if checkpoint > self._released:
            # Another replica (or our own projector, a moment ago) moved the views on: announce
            # what happened up to there first, so that the watch starts exactly at `checkpoint`.
            await self._release_to(checkpoint)
        watch.initial = values
        watch.position = checkpoint
        for key, value in values.items():
            self._track(watch, key, value)
        if watch.match is not None:
            self._matchers.add(watch)

    def _track(self, watch: Watch, key: str, value: bytes | None) -> None:
        watch.keys.add(key)
        watchers = self._by_key.setdefault(key, set())
        if not watchers:
            self._tracked[key] = value
        watchers.add(watch)

    def _untrack(self, watch: Watch, key: str) -> None:
        watchers = self._by_key.get(key)
        if watchers is None:
            return
        watchers.discard(watch)
        if not watchers:
            del self._by_key[key]
            self._tracked.pop(key, None)

    def _all_watches(self) -> Iterable[Watch]:
        for watchers in self._by_key.values():
            yield from watchers
        yield from self._matchers

    def _reset(self, baseline: int | None, error: errors.DomainError) -> None:
        for watch in list(self._all_watches()):
            watch.end(error)
        self._by_key.clear()
        self._matchers.clear()
        self._tracked.clear()
        self._released = baseline
        self._pending = {p: item for p, item in self._pending.items() if baseline is not None and p > baseline}
        for cache in self._caches:
            cache.reset(baseline)

    # -- releasing ----------------------------------------------------------------------------

    async def _release_to(self, target: int) -> None:
        assert self._released is not None
        position = self._released + 1
        while position <= target:
            if not self._by_key and not self._matchers and not any(c.holds_anything for c in self._caches):
                # Nobody to tell about the effects computed here: the caches only learn how far
                # the feed got, once for the whole run.
                computed = self._pending
                last = position - 1
                while last < target and last + 1 in computed:
                    last += 1
                    del computed[last]
                if last >= position:
                    for cache in self._caches:
                        cache.advance(last)
                    self._released = last
                    position = last + 1
                    continue
            item = self._pending.pop(position, None)
            if item is not None:
                self._deliver(item[0], item[1], exact=True)
                self._released = position
                position += 1
                continue
            if not self._by_key and not self._matchers:
                position = self._pass_unwatched(position, target)
                continue
            events = await read_positioned(self._pool, position - 1, self._batch_size, up_to=target)
            if not events or events[0].position != position:
                raise RuntimeError(f"the event log has no event at position {position}")
            for envelope in events:
                if envelope.position != position:
                    break
                pending = self._pending.pop(position, None)
                if pending is not None:
                    self._deliver(envelope, pending[1], exact=True)
                else:
                    self._deliver(envelope, await self._replay(envelope), exact=False)
                self._released = position
                position += 1

    def _pass_unwatched(self, position: int, target: int) -> int:
        """Release the run of positions from `position` that have no pending effect; the next position.

        With no watch open, an event this replica did not compute matters only to the near
        caches, and they forget everything for such an event whatever it was: reading it from
        the log (what a following replica did for every event, per projection) tells nothing.
        """
        last = position
        while last < target and last + 1 not in self._pending:
            last += 1
        for cache in self._caches:
            cache.reset(last)
            cache.advance(last)
        self.replayed += last - position + 1
        self._released = last
        return last + 1

    async def _replay(self, envelope: EventEnvelope) -> Effect:
        """The effect of an event this replica did not compute, as far as watches need it.

        Only the watched keys matter (the caches forget everything for a replayed event), so
        nothing is projected while no watch is open. Keys that are not watched are taken as
        absent: Redis cannot tell their values at the event's position (it is already past
        it), and absent is exact for the event that creates a view. The projection's logs
        are muted meanwhile: it would warn about every event of an unwatched view.
        """
        self.replayed += 1
        if not self._tracked and not self._matchers:
            return Effect()
        return await self._project_again(envelope, self._tracked)

    async def _project_again(self, envelope: EventEnvelope, known: dict[str, bytes | None]) -> Effect:
        """The effect of `envelope` projected from the values in `known` (other keys count as absent).

        An event held behind its parked sequence changed nothing, and has no effect here either.
        """
        if self._held(envelope):
            return Effect()
        keys = self._projection.state_keys(envelope) if handles(self._projection, envelope) else ()
        state: dict[str, bytes | None] = {k: known.get(k) for k in keys}
        with _muted(self._projection):
            projected = await project_run(self._projection, [envelope], state, skipped=_passed)
        ((_, effect),) = projected.effects
        return effect

    def _held(self, envelope: EventEnvelope) -> bool:
        """True when the event's sequence is parked at or before it: it was held, and changed nothing."""
        published = getattr(self._projector, "published", None)
        if published is None or not published.parked_sequences:
            return False
        parked = published.parked_sequences.get(sequence_of(self._projection, envelope))
        return parked is not None and parked.position <= envelope.position

    # -- resuming -----------------------------------------------------------------------------

    async def check_resume(self, after: int) -> None:
        """InvalidArgument when `after` is above the event log's head: no replica ever sent it."""
        head = await head_position(self._pool)
        if after > head:
            raise errors.InvalidArgument.single(
                "after_position", f"{after} is above the event log's head ({head}); send a view_position received"
            )

    def _concerns(self, envelope: EventEnvelope, followed: set[str], aggregate_type: str, ids: set[str]) -> bool:
        """Whether a replay projects `envelope`: it reads a followed key, or reads nothing and is a watched aggregate's.

        Events that read nothing create the view of their own aggregate: skipping those of
        other aggregates (most events of a long log) is what keeps a resume's replay cheap.
        """
        if not handles(self._projection, envelope):
            return False
        reads = self._projection.state_keys(envelope)
        if reads:
            return not followed.isdisjoint(reads)
        return envelope.aggregate_type == aggregate_type and envelope.aggregate_id in ids

    async def history(self, watch: Watch, resume: Resume) -> list[Change]:
        """The changes of the watch's keys after `resume.after` up to the position it opened at.

        The log is replayed from the first event of the watched aggregates, each event that
        reads a key the replay follows, or reads nothing and belongs to a watched aggregate
        (its creation), projected again (`_project_again`, as for events this replica did
        not compute); a key an event writes beside a followed one is followed from then on
        (the users projection's order notes, for instance). The last values are checked
        against the ones the watch started from: if the projection and the log disagree (an
        event an operator skipped), the watch's value wins, sent at its position, so the
        stream never contradicts the views.
        """
        up_to = watch.position
        if resume.after >= up_to or not watch.initial:
            return []
        ids = {resume.aggregate_of(key) for key in watch.initial}
        starts = await first_positions(self._pool, resume.aggregate_type, sorted(ids))
        if not starts:
            return []
        watched = set(watch.initial)
        followed: set[str] = set(watched)
        known: dict[str, bytes | None] = {}
        changes: list[Change] = []
        position = min(starts) - 1
        while position < up_to:
            events = await read_positioned(self._pool, position, self._batch_size, up_to=up_to)
            if not events:
                raise RuntimeError(f"the event log has no event after position {position}")
            for envelope in events:
                position = envelope.position
                if not self._concerns(envelope, followed, resume.aggregate_type, ids):
                    continue
                effect = await self._project_again(envelope, known)
                for key, value in effect.state.items():
                    followed.add(key)
                    known[key] = value
                    if key in watched and position > resume.after:
                        changes.append(Change(key, value, position))
        for key in sorted(watched):
            value = watch.initial[key]
            if known.get(key) != value:
                logger.warning(
                    "replaying the log for a resumed watch gave another value than the view at %s; sending the view",
                    up_to,
                    extra={"key": key},
                )
                changes = [c for c in changes if not (c.key == key and c.position == up_to)]
                changes.append(Change(key, value, up_to))
        changes.sort(key=lambda c: c.position)
        return changes

    def _deliver(self, envelope: EventEnvelope, effect: Effect, *, exact: bool) -> None:
        position = envelope.position
        if self._caches:
            # Working out the keys an effect writes is most of this bookkeeping: only when a
            # cache holds an entry or a read that the write could make stale.
            written = (
                written_keys(effect.ops)
                if exact and effect.ops and any(cache.holds_anything for cache in self._caches)
                else None
            )
            for cache in self._caches:
                if not exact:
                    cache.reset(position)
                elif written:
                    cache.invalidate(written)
                cache.advance(position)
        if not self._by_key and not self._matchers:
            return  # no watch open: nobody to tell
        for key, value in effect.state.items():
            watchers = set(self._by_key.get(key, ()))
            for watch in self._matchers:
                if key not in watch.keys and watch.match is not None and watch.match(key, value):
                    self._track(watch, key, value)
                    watchers.add(watch)
            if not watchers:
                continue
            self._tracked[key] = value
            change = Change(key, value, position)
            for watch in watchers:
                watch.offer(change)
                if watch.closed:
                    self.close_watch(watch)


class Watches:
    """The streams the query services serve from one feed, within the process's watch limit."""

    def __init__(self, feed: ChangeFeed, limiter: WatchLimiter) -> None:
        self._feed = feed
        self._limiter = limiter

    async def one(self, key: str, resume: Resume | None = None) -> AsyncGenerator[Change, None]:
        """The key's value now, then each change of it; resumed: each change after `resume.after`."""
        if resume is not None:
            await self._feed.check_resume(resume.after)
        self._limiter.acquire()
        try:
            watch = await self._feed.open([key])
            try:
                after = -1
                if resume is None:
                    yield Change(key, watch.initial.get(key), watch.position)
                else:
                    after = resume.after
                    for change in await self._feed.history(watch, resume):
                        yield change
                async for change in watch.changes():
                    if change.position > after:
                        yield change
            finally:
                self._feed.close_watch(watch)
        finally:
            self._limiter.release()

    async def matching(
        self, index_key: str, key_of: Callable[[bytes], str], match: Matcher, resume: Resume | None = None
    ) -> AsyncGenerator[tuple[int, list[Change]], None]:
        """(position, values) of the keys the index lists now, then of each change of them or of a key `match` takes.

        Resumed, the first part is instead each change of those keys after `resume.after`.
        """
        if resume is not None:
            await self._feed.check_resume(resume.after)
        self._limiter.acquire()
        try:
            watch = await self._feed.open_matching(index_key, key_of, match)
            try:
                after = -1
                if resume is None:
                    yield watch.position, [Change(k, v, watch.position) for k, v in watch.initial.items()]
                else:
                    after = resume.after
                    replayed = await self._feed.history(watch, resume)
                    for position in sorted({c.position for c in replayed}):
                        yield position, [c for c in replayed if c.position == position]
                async for change in watch.changes():
                    if change.position > after:
                        yield change.position, [change]
            finally:
                self._feed.close_watch(watch)
        finally:
            self._limiter.release()


class _FeedSettings(Protocol):
    @property
    def watch_queue_max(self) -> int: ...

    @property
    def catchup_batch_size(self) -> int: ...

    @property
    def near_cache_log_interval_s(self) -> float: ...


def attach_feed(
    projector: Any,
    projection: Projection,
    client: aioredis.Redis,
    pool: asyncpg.Pool[Any],
    *,
    cache: NearCache,
    settings: _FeedSettings,
) -> ChangeFeed:
    """A running change feed of `projector`'s effects (registered as its listener) that invalidates `cache`."""
    feed = ChangeFeed(
        projector,
        projection,
        client,
        pool,
        caches=[cache],
        queue_max=settings.watch_queue_max,
        batch_size=settings.catchup_batch_size,
        stats_interval_s=settings.near_cache_log_interval_s,
    )
    projector.effect_listeners = (*projector.effect_listeners, feed.on_effect)
    if hasattr(projector, "resolution_listeners"):
        projector.resolution_listeners = (*projector.resolution_listeners, feed.on_resolved)
    feed.start()
    return feed


def resume_at(after: int | None, aggregate_type: str, aggregate_id: str) -> Resume | None:
    """The resume point of a watch of one aggregate's view (None: start with the view now)."""
    return None if after is None else Resume(after, aggregate_type, lambda _key: aggregate_id)


def customer_orders(
    watches: Watches, keys: OrderKeys, customer_id: str, after: int | None = None
) -> AsyncIterator[tuple[int, list[Change]]]:
    """The orders of one customer now (or each change after `after`), then each change of one of them, or a new one."""
    needle = customer_id.encode()

    def belongs(key: str, value: bytes | None) -> bool:
        # A cheap test first: an order's view names its customer's id.
        return (
            value is not None
            and needle in value
            and key.startswith(keys.view(""))
            and OrderView.FromString(value).customer_id == customer_id
        )

    prefix = keys.view("")
    resume = None if after is None else Resume(after, ORDER_AGGREGATE, lambda key: key.removeprefix(prefix))
    return watches.matching(keys.by_customer(customer_id), lambda m: keys.view(member_id(m)), belongs, resume)
