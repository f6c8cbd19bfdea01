"""The relay runner: elect one active relay, and while active move outbox rows to Redis in position order."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions
from opentelemetry import trace

from relay.backoff import Backoff
from relay.leadership import POSTGRES_ERRORS, Connect, LeaderSession
from relay.metrics import record_published
from relay.outbox import Fence, LeadershipLost, claim_batch, mark_published, published_head, stranded_batch
from relay.publisher import Publisher, RedisPublisher
from relay.settings import RelaySettings
from shared_kernel.event_log import OUTBOX_NOTIFY_CHANNEL
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
        self._head = 0
        # When this relay last found no stranded rows (monotonic); None: look before the next claim.
        self._stranded_checked_at: float | None = None
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
        """Publish stranded rows (when due), then claim and publish new ones until a batch comes back short.

        Returns the count. Positions are committed before publishing: a crash after the
        commit re-publishes the same positions (the stranded look that starts the next
        cycle or leadership), whereas publishing first and crashing before the commit would
        let a later claim give those positions to other events.
        """
        batch_size = self._settings.relay_batch_size
        sent = 0
        try:
            if self._stranded_due():
                sent += await self._republish_stranded(batch_size)
            sent += await self._claim_and_publish(batch_size)
        except BaseException:
            # A claim, publish or mark cut short can leave positioned, unpublished rows.
            self._stranded_checked_at = None
            raise
        return sent

    def _stranded_due(self) -> bool:
        """Whether this cycle looks for stranded rows first.

        Only a failed cycle of this relay, or a relay that was active before it, leaves
        positioned rows unpublished: looking for them on every NOTIFY would be a Postgres
        round trip (and a pool release) in front of each event's publish. The look is also
        repeated once per poll interval, for a claim of a deposed relay that committed just
        after this one's first look.
        """
        checked = self._stranded_checked_at
        return checked is None or time.monotonic() - checked >= self._settings.relay_poll_interval_s

    async def _republish_stranded(self, batch_size: int) -> int:
        sent = 0
        checked = time.monotonic()
        while True:
            async with self._pool.acquire(timeout=self._settings.database_connect_timeout_s) as conn:
                envelopes = await stranded_batch(conn, batch_size)
            if envelopes:
                logger.info("re-publishing %d stranded events", len(envelopes), extra=_span_of(envelopes))
                await self._publish(envelopes)
                sent += len(envelopes)
            if len(envelopes) < batch_size or self._stopping.is_set():
                break
        if len(envelopes) < batch_size:
            self._stranded_checked_at = checked
        return sent

    async def _claim_and_publish(self, batch_size: int) -> int:
        sent = 0
        # The batch just published is marked while the next one is claimed: two pooled
        # connections touching different rows, so Postgres does both at once. Marks may
        # land in any order; each only needs to follow its own batch's publish.
        # A failure leaves at most the last published batch unmarked: it goes out again
        # as stranded rows, which replicas skip as duplicates.
        unmarked: list[EventEnvelope] = []
        while not self._stopping.is_set():
            if unmarked:
                envelopes = await _together(self._mark(unmarked), self._claim(batch_size))
                unmarked = []
            else:
                envelopes = await self._claim(batch_size)
            if not envelopes:
                break
            await self._publish_only(envelopes)
            unmarked = envelopes
            sent += len(envelopes)
            if len(envelopes) < batch_size:
                break
        if unmarked:
            await self._mark(unmarked)
        return sent

    async def _claim(self, batch_size: int) -> list[EventEnvelope]:
        async with self._pool.acquire(timeout=self._settings.database_connect_timeout_s) as conn:
            return await claim_batch(conn, batch_size, self._fence)

    async def _publish(self, envelopes: list[EventEnvelope]) -> None:
        await self._publish_only(envelopes)
        await self._mark(envelopes)

    async def _publish_only(self, envelopes: list[EventEnvelope]) -> None:
        await self._publisher.publish_events(envelopes)
        record_published(len(envelopes))
        self._head = max(self._head, envelopes[-1].position)

    async def _mark(self, envelopes: list[EventEnvelope]) -> None:
        async with self._pool.acquire(timeout=self._settings.database_connect_timeout_s) as conn:
            await mark_published(conn, envelopes[0].position, envelopes[-1].position)
        logger.debug("published %d events", len(envelopes), extra=_span_of(envelopes))

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
        # The previous active relay may have left positioned rows unpublished.
        self._stranded_checked_at = None
        self._set_role(Role.ACTIVE)
        try:
            await session.listen(OUTBOX_NOTIFY_CHANNEL, self._wake.set)
            async with self._pool.acquire(timeout=self._settings.database_connect_timeout_s) as conn:
                self._head = await published_head(conn)
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
                await _cancel_and_wait({work, guard, heartbeat})
            # The guard's reason comes first: a lost lock also makes the claim's fence fail.
            for task in (guard, work, heartbeat):
                if task in done and not task.cancelled() and (error := task.exception()) is not None:
                    raise error
        finally:
            self._fence = None
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
                    "relay cycle failed (%s); retrying in %.2fs, re-publishing any positioned events first",
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


async def _cancel_and_wait(tasks: set[asyncio.Task[Any]]) -> None:
    """Cancel `tasks` and wait until all have finished, cancelling again if one shrugged it off."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        # Library code can swallow a cancellation; asking again once a second is harmless.
        _, pending = await asyncio.wait(pending, timeout=1.0)


async def _together(first: Awaitable[None], second: Awaitable[_T]) -> _T:
    """Run both concurrently to the end; return the second's result, or raise an error (the first's first).

    Unlike gather, neither is left running when the other fails, and a cancellation
    cancels both and waits for them.
    """
    tasks: tuple[asyncio.Task[Any], asyncio.Task[_T]] = (asyncio.ensure_future(first), asyncio.ensure_future(second))
    try:
        await asyncio.wait(tasks)
    except BaseException:
        await _cancel_and_wait(set(tasks))
        raise
    errors = [task.exception() for task in tasks]
    for error in errors:
        if error is not None:
            raise error
    return tasks[1].result()


def _span_of(envelopes: list[EventEnvelope]) -> dict[str, int]:
    return {"first_position": envelopes[0].position, "last_position": envelopes[-1].position}
