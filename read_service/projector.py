"""The runner of one projection: its session, catch-up, key space and health.

The parts it runs live in modules of their own: the replica's one pub/sub subscription
(read_service.event_source), projecting a run of events and stopping at a poison event
(read_service.applier), the checkpointed writes (read_service.view_store), the follower role
(read_service.follower) and the state queries read (read_service.published).

Live events arrive on Redis pub/sub, which is at-most-once; the Postgres event log is the
durable source. So a session subscribes first (buffering what arrives), catches up from the
log to its head, then applies live events. An event is applied only when its position is the
checkpoint + 1 (decision 0004): a lower position is a duplicate, a higher one reveals a gap
and triggers another catch-up, as does a StreamHead heartbeat ahead of what was seen, a
re-subscription after a silent reconnect, or an overflow of the inbox. Live events that
queued up are applied together, as catch-up applies the log: one state read and one script
call. Events the projection does not handle only move the checkpoint, with the next write or
in a deferred marker. Errors talking to Redis or Postgres end the session; the projector then
reconnects with capped, jittered backoff (any other error too, logged with its traceback).

An event the projection raises on is *parked*: nothing at or after its position is applied
(the views stay exact as of the position before it), the event and its error are recorded
in Redis (read_service.generations), logged and counted, and the projector waits until an
operator skips it (`python -m read_service.admin skip`) or the checkpoint moves past it.

With `generations`, the projector also decides which key space it writes (a generation),
builds a new one when the projection's version changed, and follows the pointer when a
rebuild switches it. A light probe (every `probe_interval_s`, or at once when a query reports
a lost checkpoint) notices a Redis that lost its data (the pointer gone, the checkpoint gone
back) and a switch; a lost connection to Redis counts as a loss too, because Redis may come
back empty. Either makes the projector not ready until it has rebuilt.

With a `lease` (read_service.lease), the projector applies only while it holds its
projection's applying lease, checked before every write; otherwise it runs a Follower.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions
from opentelemetry import trace

from read_service.applier import handles, parked_record, project_run
from read_service.event_source import EventSource, Inbound, Kind, Subscriber, stop_task
from read_service.follower import Follower, FollowerHooks
from read_service.generations import Generations, ParkedEvent, Plan, generation_version, parked_key
from read_service.lease import ApplyingLease, LeaseLost, LeaseOptions, lease_key
from read_service.log_guard import Fingerprint, LogRewound, check_log, fingerprint_key
from read_service.projections.base import Effect, Op, Projection
from read_service.published import PublishedState
from read_service.view_store import CheckpointReader, Outcome, Segment, ViewStore, segments
from shared_kernel.event_log import head_position, read_positioned
from shared_kernel.telemetry import context_from_envelope
from tessera.events.v1.envelope_pb2 import EventEnvelope

logger = logging.getLogger(__name__)

# Failures that end a session and lead to a reconnect. asyncpg raises InternalClientError
# ("cannot switch to state N; another operation (2) is in progress") instead of a
# connection error when the server ends a session (a terminated backend, a restart) just
# as a query starts on it (MagicStack/asyncpg#1069).
_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.RedisError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)


class ProjectorState(enum.StrEnum):
    """Where the projector is in its life cycle."""

    STARTING = "starting"
    CATCHING_UP = "catching_up"
    LIVE = "live"
    RECONNECTING = "reconnecting"
    PARKED = "parked"
    OUTDATED = "outdated"
    # Another replica holds the applying lease: this one serves its views and follows its checkpoint.
    FOLLOWING = "following"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class ProjectorStatus:
    """A snapshot of the projector, for health, logs and tests."""

    projection: str
    state: ProjectorState
    ready: bool
    checkpoint: int
    head: int
    last_applied_at: datetime | None
    applied: int
    duplicates: int
    catch_ups: int
    reconnects: int
    # Events parked since start (each position counted once), and the one parked now, if any.
    poison_events: int
    parked: ParkedEvent | None = None
    # Times the event log was found rewound under the views (read_service.log_guard).
    log_rewinds: int = 0
    generation: str | None = None
    # With the applying lease (read_service.lease): whether this projector applies, and who does.
    applying: bool = True
    lease_holder: str | None = None
    # When the newest applied event happened (its envelope's occurred_at), for lag in seconds.
    last_applied_occurred_at: datetime | None = None


def _consecutive_after(events: Sequence[EventEnvelope], base: int) -> list[EventEnvelope]:
    """The events at base + 1, base + 2, ... (skipping those at or below `base`), up to the first hole."""
    run: list[EventEnvelope] = []
    for envelope in events:
        if envelope.position <= base:
            continue
        if envelope.position != base + len(run) + 1:
            break
        run.append(envelope)
    return run


class KeySpaceLost(Exception):
    """Redis no longer holds what this projector wrote (a flush, a restart without persistence)."""


class KeySpaceChanged(Exception):
    """The pointer names another generation than the one this projector writes."""


ReadinessCallback = Callable[[bool], Awaitable[None]]


class Projector:
    """Runs one projection against the event stream; see the module docstring."""

    def __init__(
        self,
        client: aioredis.Redis,
        pool: asyncpg.Pool[Any],
        projection: Projection,
        *,
        channel_prefix: str,
        batch_size: int = 1000,
        buffer_limit: int = 10_000,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        ping_interval_s: float = 5.0,
        subscribe_timeout_s: float = 5.0,
        gap_wait_s: float = 2.0,
        on_readiness_change: ReadinessCallback | None = None,
        on_applied: Callable[[int], None] | None = None,
        tracer: trace.Tracer | None = None,
        generations: Generations | None = None,
        probe_interval_s: float = 0.5,
        switch_grace_s: float = 2.0,
        lease: LeaseOptions | None = None,
        events_client: aioredis.Redis | None = None,
        marker_delay_s: float = 0.0,
        source: EventSource | None = None,
    ) -> None:
        self._client = client
        # The relay's Redis, where the event stream is published; the views' Redis unless a
        # replica keeps its views in a Redis server of its own.
        self._events_client = client if events_client is None else events_client
        self._pool = pool
        # The replica's one subscription, shared by its projectors; a projector built alone has its own.
        self._own_source = source is None
        self._source = source or EventSource(
            self._events_client,
            channel_prefix,
            buffer_limit=buffer_limit,
            ping_interval_s=ping_interval_s,
            subscribe_timeout_s=subscribe_timeout_s,
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s,
        )
        self._pool = pool
        self._projection = projection
        self._store = ViewStore(client, projection.checkpoint_key)
        # What queries, watches and health may read; this projector is its only writer.
        self.published = PublishedState(projection.name, lambda: self._store)
        # Without generations the key space is fixed: parked records and skips then live
        # under the channel prefix, with an empty generation name.
        self._generations = generations
        self._meta = generations or Generations(
            client,
            channel_prefix,
            projection.name,
            int(getattr(projection, "version", 1)),
            factory=lambda _: projection,
        )
        self._generation: str | None = None
        self._probe_interval_s = probe_interval_s
        self._switch_grace_s = switch_grace_s
        self._logged_park: tuple[str, int] | None = None
        self._cleanup: set[asyncio.Task[None]] = set()
        self._batch_size = batch_size
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._ping_interval_s = ping_interval_s
        self._subscribe_timeout_s = subscribe_timeout_s
        self._gap_wait_s = gap_wait_s
        self._on_readiness_change = on_readiness_change
        self._on_applied = on_applied
        self._tracer = tracer or trace.get_tracer("tessera.read_service.projector")

        self._state = ProjectorState.STARTING
        self._head = 0
        self._last_applied_at: datetime | None = None
        self._last_applied_envelope: EventEnvelope | None = None
        self._applied = 0
        self._duplicates = 0
        self._catch_ups = 0
        self._reconnects = 0
        self._poison_events = 0
        self._log_rewinds = 0
        # The last event of the newest run seen, stored with the next write (read_service.log_guard).
        self._fingerprint: Fingerprint | None = None
        # The last of the no-op events deferred past the checkpoint (none when not above it), since when.
        self._pending = 0
        self._pending_since = 0.0
        # How long trailing ignored events may stay unwritten once the inbox has drained. 0 (the
        # default) writes them as soon as it drains: under load they still ride along with the
        # next write or batch, and at rest every checkpoint reaches the head at once.
        self._marker_delay_s = marker_delay_s
        self._subscriber: Subscriber | None = None
        self._session_caught_up = False
        self._task: asyncio.Task[None] | None = None
        # Without a lease this projector applies always; with one, only while it holds it.
        self._lease = (
            None
            if lease is None
            else ApplyingLease(client, lease_key(self._meta.base, projection.name, self._meta.version), lease)
        )
        self._lease_keeper: asyncio.Task[None] | None = None

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        """Start the projector in a task of the running loop (once) and return that task."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"projector:{self._projection.name}")
        self._keep_lease()
        return self._task

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The task started by start(), if any."""
        return self._task

    async def stop(self) -> None:
        """Stop the projector and wait for it; safe to call more than once, or before start()."""
        task = self._task
        if task is not None and not task.done():
            # A cancellation can be lost on Python 3.11 (see _stop_task), so it is repeated; the
            # caller's own cancellation still propagates from the wait.
            await stop_task(task, attempts=20)
        for cleanup in list(self._cleanup):
            cleanup.cancel()
            with contextlib.suppress(asyncio.CancelledError, *_TRANSIENT_ERRORS):
                await cleanup
        await self._release_lease()
        if self._own_source:
            await self._source.close()
        self._state = ProjectorState.STOPPED

    async def run(self) -> None:
        """Project until cancelled, reconnecting after transient Redis or Postgres failures.

        Any other error is logged with its traceback and retried the same way: ending the
        task instead would leave the replica serving views that silently stop changing.
        """
        backoff = self._backoff_initial_s
        self._keep_lease()
        while True:
            self._session_caught_up = False
            try:
                if self._lease is not None and not self._lease.held:
                    await self._follower().run()
                    continue
                await self._session()
            except LeaseLost as exc:
                # Not a failure: another replica applies now (this one paused, or lost Redis for a while).
                logger.warning("%s; following the holder", exc, extra={"projection": self._projection.name})
                backoff = self._backoff_initial_s
                continue
            except KeySpaceChanged as exc:
                # Not a failure: a rebuild switched the pointer (or another replica won a build).
                logger.info("%s; following it", exc, extra={"projection": self._projection.name})
                backoff = self._backoff_initial_s
                continue
            except Exception as exc:
                if isinstance(exc, KeySpaceLost | redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
                    # Redis may come back empty: never answer from it before checking.
                    await self._set_ready(False)
                self._reconnects += 1
                self._state = ProjectorState.RECONNECTING
                if self._session_caught_up:
                    # The session worked for a while: this is a new outage, not the same one.
                    backoff = self._backoff_initial_s
                extra = {"projection": self._projection.name, "retry_in_s": round(backoff, 3)}
                if not isinstance(exc, _TRANSIENT_ERRORS):
                    logger.exception("projector session failed unexpectedly; reconnecting", extra=extra)
                else:
                    # A script error is a bug or foreign data in our key space, not an outage.
                    level = logging.ERROR if isinstance(exc, redis.exceptions.ResponseError) else logging.WARNING
                    logger.log(
                        level, "projector session ended: %s: %s; reconnecting", type(exc).__name__, exc, extra=extra
                    )
                # Jitter spreads the reconnects of many replicas after a shared outage.
                await asyncio.sleep(random.uniform(backoff / 2, backoff))  # noqa: S311
                backoff = min(backoff * 2, self._backoff_max_s)

    # -- observation -------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once the views have caught up with the event log (and until a reset is seen)."""
        return self._ready

    @property
    def checkpoint(self) -> int:
        """The last checkpoint this projector read from or wrote to Redis."""
        return self._checkpoint

    @property
    def parked(self) -> ParkedEvent | None:
        """The event this projection is stopped at, if any (the views reflect the position before it)."""
        return self._parked

    @property
    def generation(self) -> str | None:
        """The generation this projector writes (None without generations, or before it decided)."""
        return self._generation

    @property
    def read_checkpoint(self) -> CheckpointReader:
        """Reads the published checkpoint's key space from Redis (see PublishedState)."""
        return self.published.read_checkpoint

    def changed(self) -> asyncio.Event:
        """An event set the next time the checkpoint moves (see PublishedState.changed)."""
        return self.published.changed()

    # The published state is where the checkpoint, readiness and parked event live; these
    # name them inside the projector.
    @property
    def _checkpoint(self) -> int:
        return self.published.checkpoint

    @property
    def _ready(self) -> bool:
        return self.published.ready

    @property
    def _parked(self) -> ParkedEvent | None:
        return self.published.parked

    @_parked.setter
    def _parked(self, parked: ParkedEvent | None) -> None:
        self.published.publish_parked(parked)

    def status(self) -> ProjectorStatus:
        """A snapshot of the projector's state and counters."""
        return ProjectorStatus(
            projection=self._projection.name,
            state=self._state,
            ready=self._ready,
            checkpoint=self._checkpoint,
            head=self._head,
            last_applied_at=self._last_applied_at,
            applied=self._applied,
            duplicates=self._duplicates,
            catch_ups=self._catch_ups,
            reconnects=self._reconnects,
            poison_events=self._poison_events,
            parked=self._parked,
            log_rewinds=self._log_rewinds,
            generation=self._generation,
            applying=self._lease is None or self._lease.held,
            lease_holder=None if self._lease is None else self._lease.holder,
            last_applied_occurred_at=None
            if self._last_applied_envelope is None
            else self._last_applied_envelope.occurred_at.ToDatetime(tzinfo=UTC),
        )

    async def wait_for_checkpoint(self, position: int, timeout_s: float) -> bool:
        """Wait until this projector has seen the checkpoint reach `position`; False on timeout."""
        return await self.published.wait_for_checkpoint(position, timeout_s)

    # -- the applying lease (read_service.lease) -------------------------------------------------

    def _keep_lease(self) -> None:
        if self._lease is not None and self._lease_keeper is None:
            self._lease_keeper = asyncio.create_task(self._lease.run(), name=f"lease:{self._projection.name}")

    async def _release_lease(self) -> None:
        keeper, self._lease_keeper = self._lease_keeper, None
        if keeper is None or self._lease is None:
            return
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        # Given up at once rather than left to expire, so that a follower takes over in milliseconds.
        with contextlib.suppress(*_TRANSIENT_ERRORS):
            await asyncio.wait_for(self._lease.release(), self._subscribe_timeout_s)

    def _check_lease(self) -> None:
        if self._lease is not None:
            self._lease.check()

    def _follower(self) -> Follower:
        lease = self._lease
        assert lease is not None

        def following() -> None:
            self._state = ProjectorState.FOLLOWING
            self._session_caught_up = True

        async def read_checkpoint() -> int:
            return await self._store.checkpoint()

        return Follower(
            self._projection.name,
            lease,
            self._client,
            self._pool,
            self.published,
            hooks=FollowerHooks(
                checkpoint_key=lambda: self._projection.checkpoint_key,
                read_checkpoint=read_checkpoint,
                follow_keyspace=self._follow_keyspace,
                check_keyspace=self._check_keyspace,
                holder_parked=self._holder_parked,
                observe_checkpoint=self._observe_checkpoint,
                set_ready=self._set_ready,
                following=following,
            ),
            probe_interval_s=self._probe_interval_s,
            ping_interval_s=self._ping_interval_s,
            transient_errors=_TRANSIENT_ERRORS,
        )

    async def _follow_keyspace(self) -> bool:
        """Serve the pointer's generation if this version can read it; False (not ready) otherwise."""
        generations = self._generations
        if generations is None:
            return True
        current = await generations.current()
        try:
            servable = current is not None and generation_version(current) == generations.version
        except ValueError:
            servable = False
        if current is None or not servable:
            await self._set_ready(False)
            return False
        self._use(current)
        if self._on_switch_prefix is not None:
            self._on_switch_prefix(generations.prefix(current))
        return True

    async def _holder_parked(self) -> ParkedEvent | None:
        raw = await self._client.hget(parked_key(self._meta.base, self._projection.name), self._generation or "")
        return None if raw is None else ParkedEvent.from_json(raw)

    # -- one connected session ----------------------------------------------------------------

    async def _session(self) -> None:
        await self._store.load_script()
        replaces = await self._choose_keyspace()
        probe: asyncio.Task[None] | None = None
        self._pending = 0
        # Catch-up must not start before the subscription is live, or events published in
        # between would be in neither the log read nor the inbox: subscribe() returns once it is.
        subscriber = await self._source.subscribe()
        self._subscriber = subscriber
        inbox = subscriber.inbox
        try:
            await self._catch_up(target=0, building=replaces is not None)
            if replaces is not None:
                await self._finish_build(replaces)
            probe = asyncio.create_task(self._probe(inbox))
            self._session_caught_up = True
            held: collections.deque[Inbound] = collections.deque()
            while True:
                item = held.popleft() if held else await self._next(inbox)
                if item is None:
                    await self._flush_marker()
                    continue
                if item.kind is Kind.EVENT and not inbox.empty():
                    await self._handle_events(self._take_events(item, inbox, held))
                else:
                    await self._handle(item)
        finally:
            self._source.unsubscribe(subscriber)
            if probe is not None:
                await stop_task(probe)

    async def _next(self, inbox: asyncio.Queue[Inbound]) -> Inbound | None:
        """The next message; None when the pending marker is due first (the stream went quiet)."""
        due = self._marker_due_in()
        if due is None or not inbox.empty():
            return await inbox.get()
        if due <= 0:
            return None
        try:
            return await asyncio.wait_for(inbox.get(), due)
        except TimeoutError:
            return None

    async def _choose_keyspace(self) -> str | None:
        """Pick the generation to write; return the one it replaces when this session builds it.

        Returns None when the pointer's generation is served as it is. An outdated replica
        (the pointer names a newer version) stays not ready and waits for the pointer to move.
        """
        generations = self._generations
        if generations is None:
            return None
        while True:
            resolution = await generations.resolve()
            if resolution.plan is not Plan.OUTDATED:
                break
            if self._state is not ProjectorState.OUTDATED:
                logger.error(
                    "the served generation %s was built by a newer version of this projection; not serving it",
                    resolution.generation,
                    extra={"projection": self._projection.name, "version": generations.version},
                )
            self._state = ProjectorState.OUTDATED
            await self._set_ready(False)
            while await generations.current() == resolution.generation:  # noqa: ASYNC110 - a Redis key, polled
                await asyncio.sleep(self._probe_interval_s)
        self._use(resolution.generation)
        if resolution.plan is Plan.BUILD:
            logger.info(
                "building generation %s from the event log (replaces %s)",
                resolution.generation,
                resolution.replaces,
                extra={"projection": self._projection.name},
            )
            await self._set_ready(False)
            return resolution.replaces or ""
        if self._on_switch_prefix is not None:
            self._on_switch_prefix(generations.prefix(resolution.generation))
        return None

    @property
    def _on_switch_prefix(self) -> Callable[[str], None] | None:
        return None if self._generations is None else self._generations.on_switch

    def _use(self, generation: str) -> None:
        """Write to `generation` from now on (a no-op when it is already the one in use)."""
        generations = self._generations
        if generations is None or generation == self._generation:
            return
        projection = generations.factory(generations.prefix(generation))
        self._projection = projection
        self._store = ViewStore(self._client, projection.checkpoint_key)
        self._generation = generation
        self._pending = 0
        # Another key space: its checkpoint is a new baseline, not a step back.
        self.published.publish_checkpoint(0)
        self._parked = None
        self.published.read_checkpoint.key_space_lost()

    async def _finish_build(self, replaces: str) -> None:
        """Switch the pointer to the generation just built; drop the old one after a grace period."""
        generations = self._generations
        built = self._generation
        assert generations is not None and built is not None
        if not await generations.switch(replaces or None, built):
            # Another replica switched first: drop this build and serve theirs.
            self._cleanup_later(built, 0.0)
            raise KeySpaceChanged(f"generation {await generations.current()} was switched in by another builder")
        logger.info(
            "switched to generation %s", built, extra={"projection": self._projection.name, "replaced": replaces}
        )
        if generations.on_switch is not None:
            generations.on_switch(generations.prefix(built))
        await self._set_ready(True)
        if replaces:
            self._cleanup_later(replaces, self._switch_grace_s)

    def _cleanup_later(self, generation: str, delay_s: float) -> None:
        generations = self._generations
        assert generations is not None

        async def cleanup() -> None:
            # Queries that started on the old key space finish within the grace period.
            await asyncio.sleep(delay_s)
            removed = await generations.drop(generation)
            logger.info(
                "dropped generation %s (%s keys)",
                generation,
                removed,
                extra={"projection": self._projection.name},
            )

        task = asyncio.create_task(cleanup(), name=f"drop:{self._projection.name}:{generation}")
        self._cleanup.add(task)
        task.add_done_callback(self._cleanup.discard)

    async def _probe(self, inbox: asyncio.Queue[Inbound]) -> None:
        """Every probe interval: is the key space still there and still ours; can a parked event go?"""
        reported = self.published.loss_reported()
        while True:
            # A query that found the checkpoint gone back wakes the probe at once.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reported.wait(), self._probe_interval_s)
            reported.clear()
            try:
                # A holder that lost the lease while idle becomes a follower now, not at its next event.
                self._check_lease()
                retry = await self._check_keyspace()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                inbox.put_nowait(Inbound(Kind.FAILED, error=exc))
                return
            if retry:
                inbox.put_nowait(Inbound(Kind.RETRY))

    async def _check_keyspace(self) -> bool:
        """Raise KeySpaceLost or KeySpaceChanged as the probe finds; True when a parked event may go on."""
        # What this projector knew before the read: it may apply more while the read is in flight,
        # and a checkpoint behind that later value is not one that went back.
        known = self._checkpoint
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.get(self._meta.pointer)
            pipe.get(self._projection.checkpoint_key)
            pipe.get(fingerprint_key(self._projection.checkpoint_key))
            pointer_raw, checkpoint_raw, fingerprint_raw = await pipe.execute()
        pointer = None if pointer_raw is None else bytes(pointer_raw).decode()
        checkpoint = int(checkpoint_raw or 0)
        if self._generations is not None and pointer is None:
            await self._set_ready(False)
            raise KeySpaceLost("the generation pointer is gone from Redis: its data was lost")
        if self._generations is not None and pointer != self._generation:
            raise KeySpaceChanged(f"the pointer moved from generation {self._generation} to {pointer}")
        if checkpoint < known:
            await self._set_ready(False)
            raise KeySpaceLost(f"the checkpoint went back from {known} to {checkpoint}")
        await self._guard_log(Fingerprint.decode(fingerprint_raw))
        parked = self._parked
        return parked is not None and (
            checkpoint >= parked.position or await self._meta.skipped(parked.position) is not None
        )

    async def _handle(self, item: Inbound) -> None:
        if item.kind is Kind.FAILED:
            assert item.error is not None
            raise item.error
        if item.kind is Kind.RETRY:
            await self._retry_parked()
            return
        if item.kind is Kind.EVENT:
            await self._handle_events([item])
        elif item.kind is Kind.HEAD:
            self._head = max(self._head, item.head)
            if item.head > self._seen() and self._parked is None:
                await self._catch_up(target=item.head)
            elif item.head > self._checkpoint:
                # Everything up to the head was seen; only the marker is left to write.
                await self._flush_marker()
        else:
            if item.kind is Kind.OVERFLOW and self._subscriber is not None:
                self._subscriber.overflowed = False
            else:
                # Redis dropped the subscription (a restart, or this replica was too slow to
                # read) and the client re-subscribed: whatever was published meanwhile is lost.
                logger.warning(
                    "pub/sub subscription was re-established; catching up from the event log",
                    extra={"projection": self._projection.name, "checkpoint": self._checkpoint},
                )
            await self._catch_up(target=0)

    def _take_events(
        self, first: Inbound, inbox: asyncio.Queue[Inbound], held: collections.deque[Inbound]
    ) -> list[Inbound]:
        """`first` and the events queued right behind it (up to a batch); a non-event stops the run and is held."""
        run = [first]
        while len(run) < self._batch_size and not inbox.empty():
            item = inbox.get_nowait()
            if item.kind is not Kind.EVENT:
                held.append(item)
                break
            run.append(item)
        return run

    async def _handle_events(self, items: list[Inbound]) -> None:
        """Apply a run of queued live events together (the event source decoded them)."""
        envelopes: list[EventEnvelope] = []
        for item in items:
            if item.envelope is not None:
                envelopes.append(item.envelope)
                continue
            # Whatever this was, an event may hide behind it: check the log.
            await self._on_events(envelopes)
            envelopes = []
            logger.warning("undecodable message on the events channel; catching up")
            await self._catch_up(target=0)
        await self._on_events(envelopes)

    async def _on_events(self, envelopes: list[EventEnvelope]) -> None:
        """Apply live events that queued up behind each other together, as catch-up does.

        A replica that falls behind (a burst after a relay failover, a busy machine) then
        catches up at batch speed: one state read and one script call for the batch.
        """
        if not envelopes:
            return
        highest = max(e.position for e in envelopes)
        self._head = max(self._head, highest)
        if self._parked is not None:
            return
        seen = self._seen()
        if len(envelopes) == 1 and envelopes[0].position > seen + 1:
            await self._catch_up(target=highest)
            return
        # A relay re-publish can repeat positions: keep one envelope per position, in order.
        fresh = sorted({e.position: e for e in envelopes if e.position > seen}.values(), key=lambda e: e.position)
        if len(fresh) < len(envelopes):
            # Repeated positions: a relay re-publishing, or a log that went back (a failover).
            self._duplicates += len(envelopes) - len(fresh)
            await self._guard_log()
        # _apply_batch starts from the checkpoint in Redis, which another replica sharing the
        # views may have moved past ours; a gap before or inside the run is left to the log.
        if fresh and await self._apply_batch(fresh, defer=True) < highest:
            await self._catch_up(target=highest)

    async def _on_event(self, envelope: EventEnvelope) -> None:
        await self._on_events([envelope])

    # -- catch-up from the event log ------------------------------------------------------------

    async def _retry_parked(self) -> None:
        """The parked event was skipped, or another writer moved past it: resume from the log."""
        parked = self._parked
        if parked is None:
            return
        self._parked = None
        await self._catch_up(target=0)
        now = self._current_park()
        if now is None or now.position != parked.position:
            await self._meta.unpark(parked.generation)
            logger.info(
                "resumed after the parked event at position %s",
                parked.position,
                extra={"projection": self._projection.name, "checkpoint": self._checkpoint},
            )
            if now is not None:
                await self._meta.park(now)

    async def _catch_up(self, target: int, building: bool = False) -> None:
        """Apply the log from the checkpoint to its head, and to at least `target`.

        `building`: a new generation is being built; readiness waits for the switch.
        """
        if self._parked is not None:
            return
        self._state = ProjectorState.CATCHING_UP
        self._catch_ups += 1
        started = time.monotonic()
        gap_deadline: float | None = None
        # The views may hold events the log has lost since (a failover): check first.
        await self._guard_log()
        while True:
            checkpoint = await self._store.checkpoint()
            await self._observe_checkpoint(checkpoint)
            head = max(await head_position(self._pool), target)
            self._head = max(self._head, head)
            while checkpoint < head:
                events = await read_positioned(self._pool, checkpoint, self._batch_size, up_to=head)
                if not events:
                    break
                advanced = await self._apply_batch(events)
                if self._is_parked():
                    break
                if advanced == checkpoint:
                    # The log has a hole right after the checkpoint (a position not committed
                    # yet); retry below rather than spin on the same read.
                    break
                checkpoint = advanced
            if checkpoint >= target or self._is_parked():
                break
            # A live event may be ahead of what the log shows: the relay publishes right
            # after it commits, so the rows appear within moments.
            if gap_deadline is None:
                gap_deadline = time.monotonic() + self._gap_wait_s
            if time.monotonic() >= gap_deadline:
                logger.warning(
                    "event log does not reach position %s yet; will retry on the next message",
                    target,
                    extra={"projection": self._projection.name, "checkpoint": checkpoint},
                )
                break
            await asyncio.sleep(0.05)
        logger.debug(
            "caught up",
            extra={
                "projection": self._projection.name,
                "checkpoint": self._checkpoint,
                "elapsed_s": round(time.monotonic() - started, 3),
            },
        )
        if self._is_parked():
            # The views are exact as of the position before the parked event: they keep being
            # served, and the queries that read them say so (see read_service.generations).
            self._state = ProjectorState.PARKED
        else:
            self._state = ProjectorState.LIVE
        if not building:
            await self._set_ready(True)

    def _seen(self) -> int:
        """The highest position this projector is done with: the checkpoint, or a deferred marker past it."""
        return max(self._checkpoint, self._pending)

    async def _apply_batch(self, events: list[EventEnvelope], *, defer: bool = False) -> int:
        """Apply a run of consecutive events in one script call; return the position seen after it.

        Events the projection does not handle are not projected: they ride along with the next
        event that writes (the script moves the checkpoint over them). With `defer`, trailing
        ones are not written at all yet: they become the pending marker, written with the next
        write, when the stream goes idle (_flush_marker) or when it grows to a batch.
        """
        handled = [e for e in events if handles(self._projection, e)]
        keys = list(dict.fromkeys(k for e in handled for k in self._projection.state_keys(e)))
        if keys:
            checkpoint, state = await self._store.snapshot(keys)
            await self._observe_checkpoint(checkpoint)
        else:
            # Nothing to read first: the script checks the positions against the checkpoint itself.
            checkpoint, state = self._checkpoint, {}
        base = max(checkpoint, self._pending)
        run = _consecutive_after(events, base)
        if not run:
            return base
        self._fingerprint = Fingerprint(run[-1].position, run[-1].event_id)
        spans: dict[int, trace.Span] = {}
        try:
            items, poison = await self._project_run(run, state, spans)
            write = len(items)
            if defer and poison is None and items and items[-1][0] - checkpoint < self._batch_size:
                while write and not items[write - 1][1]:
                    write -= 1
            if write:
                await self._write(items[:write], run, spans, first=checkpoint + 1)
            if write < len(items):
                self._pending = items[-1][0]
                self._pending_since = self._pending_since or time.monotonic()
            if poison is not None:
                # Park only now: the events before it are in Redis and the checkpoint right before it.
                await self._flush_marker()
                spans.get(poison.position, trace.INVALID_SPAN).set_attribute("tessera.projection.outcome", "parked")
        finally:
            for span in spans.values():
                span.end()
        if poison is not None:
            await self._park(poison, self._park_error)
        return self._seen()

    async def _project_run(
        self, run: Sequence[EventEnvelope], state: Mapping[str, bytes | None], spans: dict[int, trace.Span]
    ) -> tuple[list[tuple[int, Sequence[Op]]], EventEnvelope | None]:
        """Each event's ops, in order, up to the first the projection raises on (returned too)."""

        def open_span(envelope: EventEnvelope) -> None:
            if envelope.traceparent:
                # Like the relay, no span for an event without a trace context: a root span per
                # event would be noise, and during a replay making them was a quarter of the work.
                spans[envelope.position] = self._tracer.start_span(
                    f"{self._projection.name} project",
                    context=context_from_envelope(envelope.traceparent, envelope.tracestate),
                    kind=trace.SpanKind.CONSUMER,
                    attributes=self._span_attributes(envelope),
                )

        projected = await project_run(
            self._projection,
            run,
            dict(state),
            skipped=self._skipped,
            listeners=self.effect_listeners,
            before_project=open_span,
        )
        if projected.error is not None:
            self._park_error = projected.error
        return [(envelope.position, effect.ops) for envelope, effect in projected.effects], projected.poison

    async def _skipped(self, envelope: EventEnvelope, exc: BaseException) -> bool:
        """Whether an operator skipped the event the projection raised on (it then changes nothing)."""
        skip = await self._meta.skipped(envelope.position)
        if skip is None:
            return False
        logger.warning(
            "applying nothing for the event at position %s: an operator skipped it",
            envelope.position,
            extra={"projection": self._projection.name, "skip": skip, "error": str(exc)},
        )
        return True

    async def _write(
        self,
        items: Sequence[tuple[int, Sequence[Op]]],
        run: Sequence[EventEnvelope],
        spans: Mapping[int, trace.Span],
        *,
        first: int,
    ) -> None:
        """Write `items` (from position `first`, taking pending no-op events along) in one call; record it."""
        self._check_lease()
        before, after = await self._store.write(segments(items, first), self._fingerprint)
        if after >= self._pending:
            self._pending = 0
            self._pending_since = 0.0
        self._count(before, after, [position for position, _ in items])
        for envelope in run:
            span = spans.get(envelope.position)
            if span is not None:
                outcome = (
                    Outcome.DUPLICATE
                    if envelope.position <= before
                    else Outcome.APPLIED
                    if envelope.position <= after
                    else Outcome.GAP
                )
                span.set_attribute("tessera.projection.outcome", outcome.name.lower())
            if before < envelope.position <= after and handles(self._projection, envelope):
                self._last_applied_envelope = envelope
        await self._observe_checkpoint(after)

    def _count(self, before: int, after: int, positions: Sequence[int]) -> None:
        duplicates = sum(1 for position in positions if position <= before)
        self._duplicates += duplicates
        if duplicates and self._lease is not None:
            # Only another applier moves the checkpoint between our snapshot and our write:
            # two replicas held the lease at once, and the apply script kept the order.
            logger.warning(
                "duplicate apply refused up to position %s: another replica applied it",
                before,
                extra={"projection": self._projection.name, "checkpoint": after},
            )
        if after > before:
            self._applied += after - before
            self._last_applied_at = datetime.now(UTC)
            if self._on_applied is not None:
                for position in range(before + 1, after + 1):
                    self._on_applied(position)

    async def _flush_marker(self) -> None:
        """Write the pending marker: move the checkpoint over the no-op events deferred so far."""
        pending, self._pending, self._pending_since = self._pending, 0, 0.0
        if pending <= self._checkpoint:
            return
        self._check_lease()
        before, after = await self._store.write([Segment(self._checkpoint + 1, pending)], self._fingerprint)
        self._count(before, after, [])
        await self._observe_checkpoint(after)

    def _marker_due_in(self) -> float | None:
        """Seconds until the pending marker should be written (None when there is none)."""
        if self._pending <= self._checkpoint:
            return None
        return max(self._pending_since + self._marker_delay_s - time.monotonic(), 0.0)

    # -- helpers ---------------------------------------------------------------------------------

    _park_error: BaseException = RuntimeError("no error")
    # Called with each event and the effect computed for it from the state at position - 1,
    # before it is written: the effect is the same whichever replica writes it, and it holds
    # once the checkpoint reaches the position (read_service.watch waits for that). Set per instance.
    effect_listeners: tuple[Callable[[EventEnvelope, Effect], None], ...] = ()

    def _is_parked(self) -> bool:
        # A method rather than an attribute test: the type checker would keep an earlier
        # narrowing of the attribute across the awaits that change it.
        return self._parked is not None

    def _current_park(self) -> ParkedEvent | None:
        return self._parked

    async def _park(self, envelope: EventEnvelope, exc: BaseException) -> None:
        record = parked_record(self._projection.name, self._generation or "", envelope, exc)
        self._parked = record
        self._state = ProjectorState.PARKED
        if self._logged_park != (record.generation, record.position):
            self._logged_park = (record.generation, record.position)
            self._poison_events += 1
            logger.error(
                "projection parked at position %s: %s; nothing after it is applied until an operator skips it",
                record.position,
                record.error,
                extra={
                    "projection": record.projection,
                    "generation": record.generation,
                    "position": record.position,
                    "event_id": record.event_id,
                    "event_type": record.event_type,
                    "aggregate_type": record.aggregate_type,
                    "aggregate_id": record.aggregate_id,
                    "error": record.error,
                },
            )
            logger.debug("parked event's traceback", exc_info=exc)
        await self._meta.park(record)

    async def _guard_log(self, fingerprint: Fingerprint | None = None) -> int:
        """Raise KeySpaceLost, after giving the views up, when the log went back under them; return its head."""
        if fingerprint is None:
            fingerprint = await self._store.fingerprint()
        try:
            return await check_log(self._pool, fingerprint)
        except LogRewound as exc:
            await self._give_up_views(exc)
            raise KeySpaceLost(str(exc)) from exc

    async def _give_up_views(self, rewound: LogRewound) -> None:
        """Stop serving views built from events the log no longer holds, and have them rebuilt."""
        self._log_rewinds += 1
        await self._set_ready(False)
        logger.error(
            "%s; not serving this projection until its views are rebuilt from the log",
            rewound,
            extra={
                "projection": self._projection.name,
                "generation": self._generation,
                "checkpoint": self._checkpoint,
                "log_head": rewound.head,
                "position": rewound.fingerprint.position,
            },
        )
        generations, generation = self._generations, self._generation
        if generations is not None and generation is not None:
            # Every replica serving it sees the pointer gone and builds a new generation.
            if await generations.forget(generation):
                self._cleanup_later(generation, self._switch_grace_s)
        else:
            await self._client.delete(self._projection.checkpoint_key)

    async def _observe_checkpoint(self, checkpoint: int) -> None:
        if checkpoint < self._checkpoint:
            # Redis lost data (a restart without persistence, a flush): the views are behind
            # what we served before, so stop answering until a catch-up rebuilds them.
            logger.warning(
                "checkpoint went back from %s to %s; rebuilding",
                self._checkpoint,
                checkpoint,
                extra={"projection": self._projection.name},
            )
            await self._set_ready(False)
            # What was deferred belonged to the lost data: the log says what to apply now.
            self._pending = 0
        if checkpoint != self._checkpoint:
            self.published.publish_checkpoint(checkpoint)
            if self._lease is not None and self._lease.held:
                # Followers wake on this rather than polling (read_service.lease).
                self._lease.announce(self._projection.checkpoint_key, checkpoint)

    async def _set_ready(self, ready: bool) -> None:
        if not ready:
            # Whatever the near caches hold may be gone from Redis: forget it before anything else.
            self.published.read_checkpoint.key_space_lost()
        if ready == self._ready:
            return
        self.published.publish_ready(ready)
        logger.info(
            "projection %s",
            "ready" if ready else "not ready",
            extra={"projection": self._projection.name, "checkpoint": self._checkpoint},
        )
        if self._on_readiness_change is not None:
            await self._on_readiness_change(ready)

    def _span_attributes(self, envelope: EventEnvelope) -> dict[str, str | int]:
        return {
            "messaging.system": "redis",
            "messaging.destination.name": self._source.events_channel,
            "messaging.message.id": envelope.event_id,
            "tessera.event.type": envelope.event_type,
            "tessera.event.position": envelope.position,
            "tessera.projection": self._projection.name,
        }
