"""Event intake: keeps one projection's Redis views up to date from the event stream.

Live events arrive on Redis pub/sub, which is at-most-once; the Postgres event log is
the durable source. So the projector subscribes first (buffering what arrives), catches
up from the log to its head, then applies live events. An event is applied only when its
position is the checkpoint + 1 (see view_store and projections.base): a lower position
is a duplicate, a higher one reveals a gap and triggers another catch-up, as does a
StreamHead heartbeat ahead of the checkpoint, a re-subscription after a silent
reconnect, or an overflow of the local buffer. Live events that have queued up behind
each other are applied together, in one pipeline, as catch-up applies the log. Errors
talking to Redis or Postgres end the session; the projector then reconnects with capped,
jittered backoff (any other error too, logged with its traceback).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions
from google.protobuf.message import DecodeError
from opentelemetry import trace
from redis.asyncio.client import PubSub

from read_service.projections.base import Effect, PoisonEvent, Projection
from read_service.view_store import ApplyResult, Outcome, ViewStore
from shared_kernel.event_log import events_channel, head_channel, head_position, read_positioned
from shared_kernel.telemetry import context_from_envelope
from tessera.events.v1.envelope_pb2 import EventEnvelope, StreamHead

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
    poison_events: int


class _Kind(enum.Enum):
    EVENT = "event"
    HEAD = "head"
    RESUBSCRIBED = "resubscribed"
    OVERFLOW = "overflow"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class _Inbound:
    kind: _Kind
    data: bytes = b""
    error: BaseException | None = None


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
    ) -> None:
        self._client = client
        self._pool = pool
        self._projection = projection
        self._store = ViewStore(client, projection.checkpoint_key)
        self._events_channel = events_channel(channel_prefix)
        self._head_channel = head_channel(channel_prefix)
        self._batch_size = batch_size
        self._buffer_limit = buffer_limit
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._ping_interval_s = ping_interval_s
        self._subscribe_timeout_s = subscribe_timeout_s
        self._gap_wait_s = gap_wait_s
        self._on_readiness_change = on_readiness_change
        self._on_applied = on_applied
        self._tracer = tracer or trace.get_tracer("tessera.read_service.projector")

        self._state = ProjectorState.STARTING
        self._ready = False
        self._checkpoint = 0
        self._head = 0
        self._last_applied_at: datetime | None = None
        self._applied = 0
        self._duplicates = 0
        self._catch_ups = 0
        self._reconnects = 0
        self._poison_events = 0
        self._checkpoint_changed = asyncio.Event()
        self._overflow_pending = False
        self._session_caught_up = False
        self._task: asyncio.Task[None] | None = None

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        """Start the projector in a task of the running loop (once) and return that task."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"projector:{self._projection.name}")
        return self._task

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The task started by start(), if any."""
        return self._task

    async def stop(self) -> None:
        """Stop the projector and wait for it; safe to call more than once, or before start()."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            # The projector's own cancellation is expected here; the caller's is not swallowed
            # because a cancelled caller raises CancelledError from this await as well.
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._state = ProjectorState.STOPPED

    async def run(self) -> None:
        """Project until cancelled, reconnecting after transient Redis or Postgres failures.

        Any other error is logged with its traceback and retried the same way: ending the
        task instead would leave the replica serving views that silently stop changing.
        """
        backoff = self._backoff_initial_s
        while True:
            self._session_caught_up = False
            try:
                await self._session()
            except Exception as exc:
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

    def changed(self) -> asyncio.Event:
        """An event set the next time the checkpoint moves (after the views of that move are written).

        Each move replaces it, so a reader takes it before looking at the views and waits on
        it: queries waiting for a consistency token are woken this way, not by polling.
        """
        return self._checkpoint_changed

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
        )

    async def wait_for_checkpoint(self, position: int, timeout_s: float) -> bool:
        """Wait until this projector has seen the checkpoint reach `position`; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._checkpoint < position:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            changed = self._checkpoint_changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
        return True

    # -- one connected session ----------------------------------------------------------------

    async def _session(self) -> None:
        await self._store.load_script()
        pubsub = self._client.pubsub()
        inbox: asyncio.Queue[_Inbound] = asyncio.Queue()
        subscribed = asyncio.Event()
        reader: asyncio.Task[None] | None = None
        self._overflow_pending = False
        try:
            await pubsub.subscribe(self._events_channel, self._head_channel)
            reader = asyncio.create_task(self._read(pubsub, inbox, subscribed))
            # Catch-up must not start before the subscription is live, or events published
            # in between would be in neither the log read nor the buffer.
            await self._wait_subscribed(subscribed, reader, inbox)
            await self._catch_up(target=0)
            self._session_caught_up = True
            held: collections.deque[_Inbound] = collections.deque()
            while True:
                item = held.popleft() if held else await inbox.get()
                if item.kind is _Kind.EVENT and not inbox.empty():
                    await self._handle_events(self._take_events(item, inbox, held))
                else:
                    await self._handle(item)
        finally:
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, *_TRANSIENT_ERRORS):
                    await reader
            with contextlib.suppress(*_TRANSIENT_ERRORS):
                await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py

    async def _wait_subscribed(
        self, subscribed: asyncio.Event, reader: asyncio.Task[None], inbox: asyncio.Queue[_Inbound]
    ) -> None:
        waiter = asyncio.ensure_future(subscribed.wait())
        try:
            await asyncio.wait({waiter, reader}, timeout=self._subscribe_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if subscribed.is_set():
            return
        while not inbox.empty():
            item = inbox.get_nowait()
            if item.kind is _Kind.FAILED and item.error is not None:
                raise item.error
        raise redis.exceptions.ConnectionError("pub/sub subscription was not confirmed in time")

    async def _read(self, pubsub: PubSub, inbox: asyncio.Queue[_Inbound], subscribed: asyncio.Event) -> None:
        """Move pub/sub messages into `inbox` so that Redis never holds them while we catch up."""
        confirmations = 0
        last_heard = time.monotonic()
        try:
            while True:
                message = await pubsub.get_message(timeout=self._ping_interval_s)
                now = time.monotonic()
                if message is None:
                    # Idle: a half-open TCP connection would stay silent forever, so ask for a
                    # PONG and give up on the connection when even that does not come back.
                    self._check_not_silent(now - last_heard)
                    await pubsub.ping()
                    continue
                last_heard = now
                kind = message["type"]
                if kind == "subscribe":
                    confirmations += 1
                    if confirmations == 2:
                        subscribed.set()
                    elif confirmations > 2:
                        # redis-py re-subscribed after a silent reconnect: messages may be lost.
                        inbox.put_nowait(_Inbound(_Kind.RESUBSCRIBED))
                elif kind == "message":
                    self._enqueue(inbox, message["channel"], message["data"])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            inbox.put_nowait(_Inbound(_Kind.FAILED, error=exc))

    def _check_not_silent(self, silent_s: float) -> None:
        if silent_s > 3 * self._ping_interval_s:
            raise redis.exceptions.ConnectionError("pub/sub connection went silent")

    def _enqueue(self, inbox: asyncio.Queue[_Inbound], channel: bytes | str, data: bytes) -> None:
        name = channel.decode() if isinstance(channel, bytes) else channel
        kind = _Kind.EVENT if name == self._events_channel else _Kind.HEAD
        if inbox.qsize() < self._buffer_limit:
            inbox.put_nowait(_Inbound(kind, data))
        elif not self._overflow_pending:
            # Dropping is safe: the log has every event. One marker makes us catch up later.
            self._overflow_pending = True
            inbox.put_nowait(_Inbound(_Kind.OVERFLOW))
            logger.warning("live buffer full; dropping messages until the next catch-up")

    async def _handle(self, item: _Inbound) -> None:
        if item.kind is _Kind.FAILED:
            assert item.error is not None
            raise item.error
        if item.kind is _Kind.EVENT:
            try:
                envelope = EventEnvelope.FromString(item.data)
            except DecodeError:
                # Whatever this was, an event may hide behind it: check the log.
                logger.warning("undecodable message on the events channel; catching up")
                await self._catch_up(target=0)
                return
            await self._on_event(envelope)
        elif item.kind is _Kind.HEAD:
            try:
                head = StreamHead.FromString(item.data)
            except DecodeError:
                logger.warning("undecodable message on the head channel; ignored")
                return
            self._head = max(self._head, head.position)
            if head.position > self._checkpoint:
                await self._catch_up(target=head.position)
        else:
            if item.kind is _Kind.OVERFLOW:
                self._overflow_pending = False
            else:
                # Redis dropped the subscription (a restart, or this replica was too slow to
                # read) and the client re-subscribed: whatever was published meanwhile is lost.
                logger.warning(
                    "pub/sub subscription was re-established; catching up from the event log",
                    extra={"projection": self._projection.name, "checkpoint": self._checkpoint},
                )
            await self._catch_up(target=0)

    def _take_events(
        self, first: _Inbound, inbox: asyncio.Queue[_Inbound], held: collections.deque[_Inbound]
    ) -> list[_Inbound]:
        """`first` and the events queued right behind it (up to a batch); a non-event stops the run and is held."""
        run = [first]
        while len(run) < self._batch_size and not inbox.empty():
            item = inbox.get_nowait()
            if item.kind is not _Kind.EVENT:
                held.append(item)
                break
            run.append(item)
        return run

    async def _handle_events(self, items: list[_Inbound]) -> None:
        """Decode a run of queued live events and apply them together."""
        envelopes: list[EventEnvelope] = []
        for item in items:
            try:
                envelopes.append(EventEnvelope.FromString(item.data))
            except DecodeError:
                await self._on_events(envelopes)
                envelopes = []
                logger.warning("undecodable message on the events channel; catching up")
                await self._catch_up(target=0)
        await self._on_events(envelopes)

    async def _on_events(self, envelopes: list[EventEnvelope]) -> None:
        """Apply live events that queued up behind each other in one pipeline, as catch-up does.

        A replica that falls behind (a burst after a relay failover, a busy machine) then
        catches up at batch speed instead of paying two round trips per event.
        """
        if len(envelopes) <= 1:
            for envelope in envelopes:
                await self._on_event(envelope)
            return
        highest = max(e.position for e in envelopes)
        self._head = max(self._head, highest)
        # A relay re-publish can repeat positions: keep one envelope per position, in order.
        fresh = sorted(
            {e.position: e for e in envelopes if e.position > self._checkpoint}.values(), key=lambda e: e.position
        )
        self._duplicates += len(envelopes) - len(fresh)
        # _apply_batch starts from the checkpoint in Redis, which another replica sharing the
        # views may have moved past ours; a gap before or inside the run is left to the log.
        if fresh and await self._apply_batch(fresh) < highest:
            await self._catch_up(target=highest)

    async def _on_event(self, envelope: EventEnvelope) -> None:
        position = envelope.position
        self._head = max(self._head, position)
        if position <= self._checkpoint:
            self._duplicates += 1
            return
        if position > self._checkpoint + 1:
            await self._catch_up(target=position)
            return
        await self._apply_live(envelope)

    async def _apply_live(self, envelope: EventEnvelope) -> None:
        position = envelope.position
        with self._span(envelope) as span:
            keys = self._projection.state_keys(envelope)
            checkpoint, state = await self._store.snapshot(keys)
            await self._observe_checkpoint(checkpoint)
            if checkpoint >= position:
                self._duplicates += 1
                span.set_attribute("tessera.projection.outcome", "duplicate")
                return
            if checkpoint < position - 1:
                span.set_attribute("tessera.projection.outcome", "gap")
                # Fall through to the catch-up below, outside this span.
            else:
                effect = self._project(envelope, state)
                result = await self._store.apply(position, effect.ops)
                await self._record(envelope, result, span)
                if result.outcome is not Outcome.GAP:
                    return
        await self._catch_up(target=position)

    # -- catch-up from the event log ------------------------------------------------------------

    async def _catch_up(self, target: int) -> None:
        """Apply the log from the checkpoint to its head, and to at least `target`."""
        self._state = ProjectorState.CATCHING_UP
        self._catch_ups += 1
        started = time.monotonic()
        gap_deadline: float | None = None
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
                if advanced == checkpoint:
                    # The log has a hole right after the checkpoint (a position not committed
                    # yet); retry below rather than spin on the same read.
                    break
                checkpoint = advanced
            if checkpoint >= target:
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
        self._state = ProjectorState.LIVE
        await self._set_ready(True)

    async def _apply_batch(self, events: list[EventEnvelope]) -> int:
        """Apply a run of consecutive events in one pipeline; return the checkpoint after it."""
        keys = list(dict.fromkeys(k for e in events for k in self._projection.state_keys(e)))
        checkpoint, state = await self._store.snapshot(keys)
        await self._observe_checkpoint(checkpoint)
        run: list[EventEnvelope] = []
        for envelope in events:
            if envelope.position <= checkpoint:
                continue
            if envelope.position != checkpoint + len(run) + 1:
                break
            run.append(envelope)
        if not run:
            return checkpoint
        # Later events of the batch must see the state earlier ones leave behind, before
        # any of it reaches Redis: an overlay on the snapshot plays that part.
        overlay: dict[str, bytes | None] = dict(state)
        items = []
        spans = []
        try:
            for envelope in run:
                span = self._tracer.start_span(
                    f"{self._projection.name} project",
                    context=context_from_envelope(envelope.traceparent, envelope.tracestate),
                    kind=trace.SpanKind.CONSUMER,
                    attributes=self._span_attributes(envelope),
                )
                spans.append(span)
                effect = self._project(envelope, overlay)
                overlay.update(effect.state)
                items.append((envelope.position, effect.ops))
            results = await self._store.apply_many(items)
            for envelope, span, result in zip(run, spans, results, strict=True):
                await self._record(envelope, result, span)
        finally:
            for span in spans:
                span.end()
        return max(r.checkpoint for r in results)

    # -- helpers ---------------------------------------------------------------------------------

    def _project(self, envelope: EventEnvelope, state: Mapping[str, bytes | None]) -> Effect:
        try:
            return self._projection.project(envelope, state)
        except PoisonEvent as exc:
            # Halting here would freeze every replica's views behind one bad event; skipping
            # it keeps them current and the log keeps the event for a rebuild after a fix.
            self._poison_events += 1
            logger.error(  # noqa: TRY400 - the reason is in the message; no traceback needed
                "skipping an event the projection cannot read: %s",
                exc,
                extra={
                    "projection": self._projection.name,
                    "event_id": envelope.event_id,
                    "event_type": envelope.event_type,
                    "position": envelope.position,
                },
            )
            return Effect()

    async def _record(self, envelope: EventEnvelope, result: ApplyResult, span: trace.Span) -> None:
        span.set_attribute("tessera.projection.outcome", result.outcome.name.lower())
        await self._observe_checkpoint(result.checkpoint)
        if result.outcome is Outcome.APPLIED:
            self._applied += 1
            self._last_applied_at = datetime.now(UTC)
            if self._on_applied is not None:
                self._on_applied(envelope.position)
        elif result.outcome is Outcome.DUPLICATE:
            self._duplicates += 1

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
        if checkpoint != self._checkpoint:
            self._checkpoint = checkpoint
            changed, self._checkpoint_changed = self._checkpoint_changed, asyncio.Event()
            changed.set()

    async def _set_ready(self, ready: bool) -> None:
        if ready == self._ready:
            return
        self._ready = ready
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
            "messaging.destination.name": self._events_channel,
            "messaging.message.id": envelope.event_id,
            "tessera.event.type": envelope.event_type,
            "tessera.event.position": envelope.position,
            "tessera.projection": self._projection.name,
        }

    @contextlib.contextmanager
    def _span(self, envelope: EventEnvelope) -> Iterator[trace.Span]:
        context = context_from_envelope(envelope.traceparent, envelope.tracestate)
        with self._tracer.start_as_current_span(
            f"{self._projection.name} project",
            context=context,
            kind=trace.SpanKind.CONSUMER,
            attributes=self._span_attributes(envelope),
        ) as span:
            yield span
