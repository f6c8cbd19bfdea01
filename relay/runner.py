"""The relay runner: elect one active relay, and while active move outbox rows to Redis in position order."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions
from opentelemetry import trace

from relay.leadership import POSTGRES_ERRORS, Connect, LeaderSession
from relay.metrics import record_published
from relay.outbox import Claim, Fence, LeadershipLost, claim_batch, published_head, record_watermark
from relay.publisher import Publisher, RedisPublisher
from relay.settings import RelaySettings
from shared_kernel.contracts.event_log import OUTBOX_NOTIFY_CHANNEL, head_position, read_positioned
from shared_kernel.platform.backoff import Backoff
from shared_kernel.platform.runtime import cancel_and_wait
from tessera.events.v1.envelope_pb2 import EventEnvelope, StreamHead

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

_DEPENDENCY_ERRORS: tuple[type[BaseException], ...] = (*POSTGRES_ERRORS, redis.exceptions.RedisError)

# The lock session must notice a dead peer in seconds, not after the kernel's two-hour
# keepalive default: the server then ends the session (releasing the lock for a standby)
# about 11 s after the relay's host went silent, and tcp_user_timeout covers a peer that
# vanished with NOTIFYs still unacknowledged. Needs Postgres 12 or later.
_SESSION_SERVER_SETTINGS = {
    "application_name": "tessera-relay-lock",
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "10000",
}


class Role(enum.Enum):
    """What a relay process is doing right now."""

    STARTING = "starting"
    STANDBY = "standby"
    ACTIVE = "active"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class _Batch:
    """One claim's worth of publishing: positions (after, stranded_to] read back first, then the claimed events."""

    after: int
    stranded_to: int
    claim: Claim | None = None

    @property
    def claimed(self) -> int:
        """Events the claim positioned."""
        return self.claim.count if self.claim is not None else 0

    @property
    def count(self) -> int:
        """Events this batch publishes (positions are gap-free, so the stranded range counts itself)."""
        return self.stranded_to - self.after + self.claimed


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__name__}: {exc}"


class Relay:
    """Moves committed outbox rows to Redis pub/sub with gap-free positions, as the one active relay.

    `run()` serves until `shutdown()`; `run_once()` does a single drain for tests and tools.
    """

    def __init__(
        self,
        settings: RelaySettings,
        pool: asyncpg.Pool[Any],
        redis: aioredis.Redis,
        *,
        connect: Connect | None = None,
        publisher: Publisher | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._connect: Connect = connect or self._connect_session
        self._publisher: Publisher = publisher or RedisPublisher(redis, settings.redis_key_prefix, tracer)
        self._role = Role.STARTING
        self._fence: Fence | None = None
        # Every position up to _head has gone out from this relay (or was published before
        # the watermark it started from); _queued is the highest position handed to a
        # publish (the next claim expects to find positions there); _recorded is the highest
        # watermark this relay wrote or read. _loaded: the watermark was read since leading began.
        self._head = 0
        self._queued = 0
        self._recorded = 0
        self._loaded = False
        # Set when leading begins and after a failed cycle: publish what is positioned above
        # _head before claiming anything new.
        self._look_for_stranded = True
        self._heartbeat_failing = False
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._started = False
        self._work: asyncio.Task[None] | None = None

    @property
    def role(self) -> Role:
        """The current role; only an ACTIVE relay positions and publishes."""
        return self._role

    @property
    def published_head(self) -> int:
        """Highest position this relay knows to be published (what the heartbeat announces)."""
        return self._head

    async def run(self) -> None:
        """Serve until shutdown(): stand by for the lock, relay while holding it, reconnect after failures."""
        if self._started:
            raise RuntimeError("a Relay runs once; create a new one to run again")
        self._started = True
        backoff = Backoff(initial=0.1, cap=5.0)
        try:
            while not self._stopping.is_set():
                try:
                    await self._serve_session(backoff)
                except LeadershipLost as exc:
                    logger.warning("relay stopped relaying: %s", exc, extra={"lock_key": self._settings.relay_lock_key})
                    await self._sleep_unless_stopping(backoff.next_delay())
                except POSTGRES_ERRORS as exc:
                    delay = backoff.next_delay()
                    logger.warning(
                        "relay lock session failed (%s); reconnecting in %.2fs",
                        _describe(exc),
                        delay,
                        extra={"attempt": backoff.attempts},
                    )
                    await self._sleep_unless_stopping(delay)
        finally:
            self._set_role(Role.STOPPED)
            self._stopped.set()

    async def shutdown(self) -> None:
        """Finish the batch in flight (cancel it after the grace period), release the lock, return; idempotent."""
        self._stopping.set()
        self._wake.set()
        if not self._started or self._stopped.is_set():
            return
        waiter = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait({waiter}, timeout=self._settings.relay_shutdown_grace_s)
            if not waiter.done():
                logger.warning(
                    "relay batch still running after %.1fs; cancelling it (it will be re-published)",
                    self._settings.relay_shutdown_grace_s,
                )
                if self._work is not None:
                    self._work.cancel()
                await waiter
        finally:
            waiter.cancel()

    async def run_once(self) -> int:
        """Publish what is positioned but not published, then claim and publish until a claim comes back short.

        Returns the count. Positions are committed before publishing: a crash after the
        commit re-publishes the same positions (they lie above the published watermark,
        and the next claim shows them), whereas publishing first and crashing before the
        commit would let a later claim give those positions to other events.
        """
        batch_size = self._settings.relay_batch_size
        if not self._loaded:
            await self._load_watermark()
        sent = 0
        try:
            if self._look_for_stranded:
                sent += await self._republish_stranded(batch_size)
            sent += await self._drain(batch_size)
            await self._record_published()
        except BaseException:
            # What was in flight may not have gone out: it goes out again before anything new.
            self._queued = self._head
            self._look_for_stranded = True
            raise
        return sent

    async def _republish_stranded(self, batch_size: int) -> int:
        """Publish every position above this relay's head that was handed out, before claiming more.

        Only a failed cycle, or a relay active before this one, leaves such positions; the
        look keeps a Redis outage from positioning a new batch on every retry.
        """
        async with self._pool.acquire(timeout=self._settings.database_connect_timeout_s) as conn:
            positioned = await head_position(conn)
        batch = _Batch(self._head, max(self._head, positioned))
        if batch.count:
            logger.info(
                "re-publishing positions %d to %d",
                batch.after + 1,
                batch.stranded_to,
                extra={"first_position": batch.after + 1, "last_position": batch.stranded_to},
            )
            await self._publish(batch, batch_size)
        self._queued = max(self._queued, batch.stranded_to)
        self._look_for_stranded = False
        return batch.count

    async def _drain(self, batch_size: int) -> int:
        sent = 0
        size = batch_size
        batch = await self._claim(size)
        while batch.count:
            sent += batch.count
            if batch.claimed < size or self._stopping.is_set():
                await self._publish(batch, batch_size)
                break
            # A full batch means a backlog: the next claim takes twice as many rows, up to
            # relay_max_batch_size. Each claim pays a fixed cost in Postgres (a statement, a
            # commit, a walk of the unpositioned index past the rows positioned before it),
            # which at the base size was a fifth of the claim's time per event. A cycle
            # starts again at the base size, so a trickle is claimed in small batches.
            size = min(size * 2, max(batch_size, self._settings.relay_max_batch_size))
            # Publish this batch (building its envelopes) while the next one is claimed, so
            # Postgres, the relay and Redis work at the same time. Publishes stay in
            # position order (the next one starts after both have finished); a failure of
            # either leaves positioned rows above the watermark, which the next cycle
            # publishes again.
            batch = await _together(self._publish(batch, batch_size), self._claim(size))
        return sent

    async def _claim(self, batch_size: int) -> _Batch:
        # The watermark goes along with the claim while it is behind; never ahead of what
        # has gone out (a publish may be in flight while this claim runs).
        published = self._head if self._head > self._recorded else None
        async with self._pool.acquire(timeout=self._settings.database_connect_timeout_s) as conn:
            claim = await claim_batch(conn, batch_size, self._fence, published)
        if published is not None and claim.count:
            self._recorded = published
        # Positions this relay did not queue: a failed cycle, or a relay that was active
        # before (or was deposed without knowing it), positioned them; they go out first.
        stranded_to = max(self._queued, claim.positioned_before)
        batch = _Batch(self._queued, stranded_to, claim)
        if stranded_to > self._queued:
            logger.info(
                "re-publishing positions %d to %d",
                self._queued + 1,
                stranded_to,
                extra={"first_position": self._queued + 1, "last_position": stranded_to},
            )
        self._queued = claim.last_position if claim.count else stranded_to
        return batch

    async def _publish(self, batch: _Batch, batch_size: int) -> None:
        after = batch.after
        while after < batch.stranded_to:
            async with self._pool.acquire(timeout=self._settings.database_connect_timeout_s) as conn:
                envelopes = await read_positioned(conn, after, batch_size, up_to=batch.stranded_to)
            if not envelopes:
                raise RuntimeError(f"positions {after + 1} to {batch.stranded_to} are missing from the outbox")
            await self._publish_only(envelopes)
            after = envelopes[-1].position
        if batch.claim is not None and batch.claim.count:
            await self._publish_only(batch.claim.envelopes)

    async def _publish_only(self, envelopes: list[EventEnvelope]) -> None:
        await self._publisher.publish_events(envelopes)
        record_published(len(envelopes))
        self._head = max(self._head, envelopes[-1].position)
        logger.debug("published %d events", len(envelopes), extra=_span_of(envelopes))

    async def _record_published(self) -> None:
        head = self._head
        if head > self._recorded:
            async with self._pool.acquire(timeout=self._settings.database_connect_timeout_s) as conn:
                await record_watermark(conn, head)
            self._recorded = head

    async def _load_watermark(self) -> None:
        async with self._pool.acquire(timeout=self._settings.database_connect_timeout_s) as conn:
            watermark = await published_head(conn)
        self._head = self._queued = self._recorded = watermark
        self._loaded = True
        self._look_for_stranded = True

    async def _serve_session(self, backoff: Backoff) -> None:
        session = await LeaderSession.open(
            self._connect, self._settings.relay_lock_key, self._settings.database_connect_timeout_s
        )
        try:
            self._set_role(Role.STANDBY)
            while True:
                if self._stopping.is_set():
                    return
                if await session.try_acquire():
                    break
                # A standby whose retries succeed is healthy; a later failure starts backoff afresh.
                backoff.reset()
                await self._sleep_unless_stopping(self._settings.relay_standby_retry_s)
            backoff.reset()
            await self._lead(session)
        finally:
            await session.close()

    async def _lead(self, session: LeaderSession) -> None:
        self._fence = session.fence
        self._set_role(Role.ACTIVE)
        try:
            await session.listen(OUTBOX_NOTIFY_CHANNEL, self._wake.set)
            # Start from the recorded watermark: what a previous active relay positioned
            # above it may not have gone out, and goes out again.
            await self._load_watermark()
            # Rows may have piled up while no relay was active: drain them now.
            self._wake.set()
            work = asyncio.create_task(self._relay_loop(), name="relay-loop")
            guard = asyncio.create_task(self._guard(session), name="relay-lock-guard")
            heartbeat = asyncio.create_task(self._heartbeat_loop(), name="relay-heartbeat")
            self._work = work
            try:
                # The heartbeat only ends by failing; waiting on it too keeps a bug in it from
                # silently ending the heartbeats that replicas rely on to notice a lost tail.
                done, _ = await asyncio.wait({work, guard, heartbeat}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._work = None
                # Relaying has stopped before the lock can be released.
                await cancel_and_wait({work, guard, heartbeat})
            # The guard's reason comes first: a lost lock also makes the claim's fence fail.
            for task in (guard, work, heartbeat):
                if task in done and not task.cancelled() and (error := task.exception()) is not None:
                    raise error
        finally:
            self._fence = None
            # Another relay may lead in between: read the watermark again before relaying again.
            self._loaded = False
            self._set_role(Role.STOPPED if self._stopping.is_set() else Role.STANDBY)

    async def _relay_loop(self) -> None:
        backoff = Backoff(initial=0.1, cap=5.0)
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                await self.run_once()
            except _DEPENDENCY_ERRORS as exc:
                delay = backoff.next_delay()
                logger.warning(
                    "relay cycle failed (%s); retrying in %.2fs, re-publishing unpublished positions first",
                    _describe(exc),
                    delay,
                    extra={"attempt": backoff.attempts},
                )
                await self._sleep_unless_stopping(delay)
                continue
            if backoff.attempts:
                logger.info("relay recovered after %d failed attempts", backoff.attempts)
                backoff.reset()
            await self._wait_for_work()

    async def _guard(self, session: LeaderSession) -> None:
        """Return never; raise LeadershipLost as soon as the lock session closes or fails a check."""
        while True:
            await session.check()
            if await _wait_event(session.lost, self._settings.relay_heartbeat_interval_s):
                raise LeadershipLost("the lock connection closed")

    async def _heartbeat_loop(self) -> None:
        interval = self._settings.relay_heartbeat_interval_s
        while True:
            head = StreamHead(position=self._head)
            head.sent_at.GetCurrentTime()
            try:
                # Bounded so a hung Redis cannot stack up heartbeats.
                async with asyncio.timeout(max(interval, 1.0)):
                    await self._publisher.publish_head(head)
            except _DEPENDENCY_ERRORS as exc:
                if not self._heartbeat_failing:
                    logger.warning("relay heartbeat failed (%s); retrying every %.1fs", _describe(exc), interval)
                self._heartbeat_failing = True
            else:
                if self._heartbeat_failing:
                    logger.info("relay heartbeat recovered")
                self._heartbeat_failing = False
            await asyncio.sleep(interval)

    async def _wait_for_work(self) -> None:
        if not self._stopping.is_set():
            await _wait_event(self._wake, self._settings.relay_poll_interval_s)

    async def _sleep_unless_stopping(self, delay: float) -> None:
        await _wait_event(self._stopping, delay)

    def _set_role(self, role: Role) -> None:
        previous, self._role = self._role, role
        if previous is not role:
            logger.info(
                "relay role: %s",
                role.value,
                extra={"role": role.value, "previous_role": previous.value, "lock_key": self._settings.relay_lock_key},
            )

    async def _connect_session(self) -> asyncpg.Connection[Any]:
        conn = await asyncpg.connect(
            str(self._settings.database_url),
            timeout=self._settings.database_connect_timeout_s,
            server_settings=_SESSION_SERVER_SETTINGS,
        )
        try:
            await _limit_idle_time(
                conn, self._settings.relay_lock_idle_timeout_s, self._settings.database_connect_timeout_s
            )
        except BaseException:
            conn.terminate()
            raise
        return conn


async def _limit_idle_time(conn: asyncpg.Connection[Any], seconds: float, timeout_s: float) -> None:
    """Have Postgres end the session after `seconds` without a query from us (0: never).

    A relay that is alive but frozen (SIGSTOP, a VM pause, a blocked event loop) keeps its
    TCP session, and with it the lock: the kernel still answers keepalives. The chaos
    suite's SIGSTOP scenario showed the whole stream stalling for as long as the freeze
    lasts. A healthy session queries every heartbeat or standby retry, so only a frozen
    one stays idle this long; Postgres then ends it and a standby takes the lock.
    Positions stay safe: the frozen relay's next claim fails its fence.
    """
    if not seconds:
        return
    if conn.get_server_version().major < 14:
        # idle_session_timeout is Postgres 14+; older servers keep the previous behaviour.
        logger.info("Postgres before 14: a frozen relay keeps the lock until its session ends")
        return
    await conn.execute(
        "SELECT set_config('idle_session_timeout', $1, false)", f"{round(seconds * 1000)}ms", timeout=timeout_s
    )


async def _wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait for `event` at most `seconds`; return whether it is set."""
    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
    # arrives as the inner wait completes, and a task that ignores cancel never stops.
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()


async def _together(first: Awaitable[None], second: Awaitable[_T]) -> _T:
    """Run both concurrently to the end; return the second's result, or raise an error (the first's first).

    The second starts first: the relay's claim sends its statement before the publish
    spends the CPU it needs on building envelopes, so Postgres is not left waiting.
    Unlike gather, neither is left running when the other fails, and a cancellation
    cancels both and waits for them.
    """
    started_second = asyncio.ensure_future(second)
    tasks: tuple[asyncio.Task[Any], asyncio.Task[_T]] = (asyncio.ensure_future(first), started_second)
    try:
        await asyncio.wait(tasks)
    except BaseException:
        await cancel_and_wait(tasks)
        raise
    errors = [task.exception() for task in tasks]
    for error in errors:
        if error is not None:
            raise error
    return tasks[1].result()


def _span_of(envelopes: list[EventEnvelope]) -> dict[str, int]:
    return {"first_position": envelopes[0].position, "last_position": envelopes[-1].position}
