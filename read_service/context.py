"""What the parts of one projection's runner share: its settings, key space, progress and counters.

The runner (read_service.runner) builds one ProjectionContext and hands it to the parts it
runs: the session (read_service.session), catch-up (read_service.catch_up), the batch applier
(read_service.batches), the probe (read_service.probe), the key space (read_service.keyspace)
and parking (read_service.parking). Each part changes the context only through its own
concern; what the rest of the replica may read goes out through `published`.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions
from opentelemetry import trace

from read_service.applier import EffectListener
from read_service.event_source import EventSource
from read_service.generations import Generations, ParkedEvent
from read_service.lease import ApplyingLease, LeaseOptions
from read_service.log_guard import Fingerprint
from read_service.projections.base import Projection
from read_service.published import PublishedState
from read_service.view_store import ViewStore
from tessera.events.v1.envelope_pb2 import EventEnvelope

logger = logging.getLogger(__name__)

# Failures that end a session and lead to a reconnect. asyncpg raises InternalClientError
# ("cannot switch to state N; another operation (2) is in progress") instead of a
# connection error when the server ends a session (a terminated backend, a restart) just
# as a query starts on it (MagicStack/asyncpg#1069).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.RedisError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)

ReadinessCallback = Callable[[bool], Awaitable[None]]


class ParkingMode(enum.StrEnum):
    """What a projection does with an event it cannot apply (decision 0029)."""

    # Park that aggregate's sequence (the event and every later event of the aggregate) and go on.
    AGGREGATE = "aggregate"
    # Stop the whole projection at the event until an operator skips it.
    PROJECTION = "projection"


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
class ProjectorOptions:
    """The projector's tunables; the defaults are the replica's."""

    channel_prefix: str
    batch_size: int = 1000
    # Events per log read of a catch-up far behind the head (a start, a lost Redis): fewer,
    # larger reads and script calls.
    catch_up_page: int = 5000
    buffer_limit: int = 10_000
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 5.0
    ping_interval_s: float = 5.0
    subscribe_timeout_s: float = 5.0
    # How long catch-up waits for the log to reach a position a live event announced.
    gap_wait_s: float = 2.0
    probe_interval_s: float = 0.5
    # How long an old generation stays after a switch, for the queries still reading it.
    switch_grace_s: float = 2.0
    # How long trailing ignored events may stay unwritten once the inbox has drained. At a
    # steady trickle (one event per relay cycle) 0 would cost every projection that ignores an
    # event a script call, a checkpoint write and a publish per event, about a third of Redis's
    # commands per AddProduct; 50 ms lets them ride with the next write or one marker instead.
    # Nothing waits on an ignored position: consistency tokens name an aggregate the projection
    # handles, whose event is written at once.
    marker_delay_s: float = 0.05
    parking: ParkingMode = ParkingMode.AGGREGATE


@dataclass(frozen=True, slots=True)
class ProjectorLinks:
    """What the replica wires a projector to; all optional for a projector run alone."""

    # The replica's one subscription; a projector without one has its own.
    source: EventSource | None = None
    # The relay's Redis, when the views live in a Redis of their own.
    events_client: aioredis.Redis | None = None
    # Key spaces by generation (read_service.generations); without, the key space is fixed.
    generations: Generations | None = None
    # Apply only while holding the projection's applying lease (read_service.lease).
    lease: LeaseOptions | None = None
    on_readiness_change: ReadinessCallback | None = None
    on_applied: Callable[[int], None] | None = None
    tracer: trace.Tracer | None = None


@dataclass(slots=True)
class Counters:
    """What the projector counts for status and metrics."""

    head: int = 0
    applied: int = 0
    duplicates: int = 0
    catch_ups: int = 0
    reconnects: int = 0
    # Events parked since start (each position counted once).
    poison_events: int = 0
    # Times the event log was found rewound under the views (read_service.rewind).
    log_rewinds: int = 0
    last_applied_at: datetime | None = None
    last_applied_envelope: EventEnvelope | None = None


@dataclass(eq=False)
class ProjectionContext:
    """One projection's shared runtime state; see the module docstring."""

    client: aioredis.Redis
    pool: asyncpg.Pool[Any]
    projection: Projection
    options: ProjectorOptions
    links: ProjectorLinks
    source: EventSource
    # The pointer, parked records and skips (a fixed key space gets one under the channel prefix).
    meta: Generations
    published: PublishedState = field(init=False)
    store: ViewStore = field(init=False)
    lease: ApplyingLease | None = None
    generation: str | None = None
    state: ProjectorState = ProjectorState.STARTING
    counters: Counters = field(default_factory=Counters)
    # The last of the no-op events deferred past the checkpoint (0: none), and since when.
    pending: int = 0
    pending_since: float = 0.0
    # Called with each event and its effect before it is written (read_service.watch).
    effect_listeners: tuple[EffectListener, ...] = ()
    # Called with the keys an operator's retry or skip wrote (no checkpoint moved for them);
    # None when another process settled one and the keys are unknown.
    resolution_listeners: tuple[Callable[[Sequence[str] | None], None], ...] = ()
    # Set once a session (or the follower) worked: a later failure is a new outage.
    session_caught_up: bool = False
    # The last event of the newest run seen, stored with the next write (read_service.log_guard).
    fingerprint: Fingerprint | None = None

    def __post_init__(self) -> None:
        self.store = ViewStore(self.client, self.projection.checkpoint_key)
        # What queries, watches and health may read; the projector is its only writer.
        self.published = PublishedState(self.projection.name, lambda: self.store)

    @property
    def name(self) -> str:
        """The projection's name, for logs."""
        return self.projection.name

    @property
    def checkpoint(self) -> int:
        """The checkpoint last seen in Redis (published)."""
        return self.published.checkpoint

    @property
    def parked(self) -> ParkedEvent | None:
        """The event the whole projection is stopped at (projection parking only)."""
        return self.published.parked

    @parked.setter
    def parked(self, parked: ParkedEvent | None) -> None:
        self.published.publish_parked(parked)

    def is_parked(self) -> bool:
        """True while the whole projection is stopped at an event.

        A method rather than a test of `parked`: the type checker would keep an earlier
        narrowing of the attribute across the awaits that change it.
        """
        return self.published.parked is not None

    def seen(self) -> int:
        """The highest position the projector is done with: the checkpoint, or a deferred marker past it."""
        return max(self.checkpoint, self.pending)

    def check_lease(self) -> None:
        """Raise LeaseLost unless this projector may write (always, without a lease)."""
        if self.lease is not None:
            self.lease.check()

    async def observe_checkpoint(self, checkpoint: int) -> None:
        """Publish a checkpoint read from or written to Redis; a step back means Redis lost data."""
        if checkpoint < self.checkpoint:
            # Redis lost data (a restart without persistence, a flush): the views are behind
            # what we served before, so stop answering until a catch-up rebuilds them.
            logger.warning(
                "checkpoint went back from %s to %s; rebuilding",
                self.checkpoint,
                checkpoint,
                extra={"projection": self.name},
            )
            await self.set_ready(False)
            # What was deferred belonged to the lost data: the log says what to apply now.
            self.pending = 0
        if checkpoint != self.checkpoint:
            self.published.publish_checkpoint(checkpoint)
            if self.lease is not None and self.lease.held:
                # Followers wake on this rather than polling (read_service.lease).
                self.lease.announce(self.projection.checkpoint_key, checkpoint)

    async def set_ready(self, ready: bool) -> None:
        """Publish readiness (and tell the replica when it changes)."""
        if not ready:
            # Whatever the near caches hold may be gone from Redis: forget it before anything else.
            self.published.read_checkpoint.key_space_lost()
        if ready == self.published.ready:
            return
        self.published.publish_ready(ready)
        logger.info(
            "projection %s",
            "ready" if ready else "not ready",
            extra={"projection": self.name, "checkpoint": self.checkpoint},
        )
        if self.links.on_readiness_change is not None:
            await self.links.on_readiness_change(ready)
