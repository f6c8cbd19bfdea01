"""The runner of one projection: its life cycle, reconnects, applying lease and health.

A Projector starts one task that runs sessions (read_service.session: subscribe, catch up,
apply live) one after another: a session that fails on Redis or Postgres is followed by another
after a capped, jittered backoff (any other error too, logged with its traceback). With an
applying lease (read_service.lease) it runs a session only while it holds the lease and a
Follower (read_service.follower) otherwise. Which key space it writes is read_service.keyspace;
what queries, watches and health may read is its PublishedState (read_service.published).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions

from read_service.applier import EffectListener
from read_service.context import (
    TRANSIENT_ERRORS,
    ProjectionContext,
    ProjectorLinks,
    ProjectorOptions,
    ProjectorState,
)
from read_service.event_source import EventSource
from read_service.follower import Follower, FollowerHooks
from read_service.generations import Generations, ParkedEvent
from read_service.keyspace import KeySpace
from read_service.lease import ApplyingLease, LeaseLost, lease_key
from read_service.parking import Parking
from read_service.probe import KeySpaceChanged, KeySpaceLost
from read_service.projections.base import Projection
from read_service.published import PublishedState
from read_service.session import Session
from read_service.status import ProjectorStatus, snapshot
from read_service.view_store import CheckpointReader
from shared_kernel.platform.backoff import Backoff
from shared_kernel.platform.runtime import cancel_and_wait

logger = logging.getLogger(__name__)


class Projector:
    """Runs one projection against the event stream; see the module docstring."""

    def __init__(
        self,
        client: aioredis.Redis,
        pool: asyncpg.Pool[Any],
        projection: Projection,
        options: ProjectorOptions,
        links: ProjectorLinks | None = None,
    ) -> None:
        links = links or ProjectorLinks()
        events_client = client if links.events_client is None else links.events_client
        self._own_source = links.source is None
        source = links.source or EventSource(
            events_client,
            options.channel_prefix,
            buffer_limit=options.buffer_limit,
            ping_interval_s=options.ping_interval_s,
            subscribe_timeout_s=options.subscribe_timeout_s,
            backoff_initial_s=options.backoff_initial_s,
            backoff_max_s=options.backoff_max_s,
        )
        # Without generations the key space is fixed: parked records and skips then live
        # under the channel prefix, with an empty generation name.
        meta = links.generations or Generations(
            client,
            options.channel_prefix,
            projection.name,
            int(getattr(projection, "version", 1)),
            factory=lambda _: projection,
        )
        self._ctx = ctx = ProjectionContext(client, pool, projection, options, links, source, meta)
        # Without a lease this projector applies always; with one, only while it holds it.
        self._lease = (
            None
            if links.lease is None
            else ApplyingLease(client, lease_key(meta.base, projection.name, meta.version), links.lease)
        )
        ctx.lease = self._lease
        self._lease_keeper: asyncio.Task[None] | None = None
        parking = Parking(ctx)
        self._keyspace = KeySpace(ctx, parking)
        self._session = Session(ctx, self._keyspace, parking)
        self._task: asyncio.Task[None] | None = None

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        """Start the projector in a task of the running loop (once) and return that task."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"projector:{self._ctx.name}")
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
            # A cancellation can be lost on Python 3.11 (see shared_kernel.platform.runtime.cancel_and_wait),
            # so it is repeated; the caller's own cancellation still propagates from the wait.
            await cancel_and_wait([task], wait_s=0.5, attempts=20)
        await self._keyspace.close()
        await self._release_lease()
        if self._own_source:
            await self._ctx.source.close()
        self._ctx.state = ProjectorState.STOPPED

    async def run(self) -> None:
        """Project until cancelled, reconnecting after transient Redis or Postgres failures.

        Any other error is logged with its traceback and retried the same way: ending the
        task instead would leave the replica serving views that silently stop changing.
        """
        ctx = self._ctx
        backoff = Backoff(ctx.options.backoff_initial_s, ctx.options.backoff_max_s)
        self._keep_lease()
        while True:
            ctx.session_caught_up = False
            try:
                if self._lease is not None and not self._lease.held:
                    await self._follower().run()
                    continue
                await self._session.run()
            except LeaseLost as exc:
                # Not a failure: another replica applies now (this one paused, or lost Redis for a while).
                logger.warning("%s; following the holder", exc, extra={"projection": ctx.name})
                backoff.reset()
                continue
            except KeySpaceChanged as exc:
                # Not a failure: a rebuild switched the pointer (or another replica won a build).
                logger.info("%s; following it", exc, extra={"projection": ctx.name})
                backoff.reset()
                continue
            except Exception as exc:
                if isinstance(exc, KeySpaceLost | redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
                    # Redis may come back empty: never answer from it before checking.
                    await ctx.set_ready(False)
                ctx.counters.reconnects += 1
                ctx.state = ProjectorState.RECONNECTING
                if ctx.session_caught_up:
                    # The session worked for a while: this is a new outage, not the same one.
                    backoff.reset()
                delay = backoff.next_delay()
                self._log_failure(exc, delay)
                await asyncio.sleep(delay)

    def _log_failure(self, exc: Exception, backoff: float) -> None:
        extra = {"projection": self._ctx.name, "retry_in_s": round(backoff, 3)}
        if not isinstance(exc, TRANSIENT_ERRORS):
            logger.error("projector session failed unexpectedly; reconnecting", extra=extra, exc_info=exc)
            return
        # A script error is a bug or foreign data in our key space, not an outage.
        level = logging.ERROR if isinstance(exc, redis.exceptions.ResponseError) else logging.WARNING
        logger.log(level, "projector session ended: %s: %s; reconnecting", type(exc).__name__, exc, extra=extra)

    # -- observation -------------------------------------------------------------------------

    @property
    def published(self) -> PublishedState:
        """What queries, watches and health may read; this projector is its only writer."""
        return self._ctx.published

    @property
    def ready(self) -> bool:
        """True once the views have caught up with the event log (and until a reset is seen)."""
        return self._ctx.published.ready

    @property
    def checkpoint(self) -> int:
        """The last checkpoint this projector read from or wrote to Redis."""
        return self._ctx.checkpoint

    @property
    def parked(self) -> ParkedEvent | None:
        """The event this projection is stopped at, if any (the views reflect the position before it)."""
        return self._ctx.parked

    @property
    def generation(self) -> str | None:
        """The generation this projector writes (None without generations, or before it decided)."""
        return self._ctx.generation

    @property
    def read_checkpoint(self) -> CheckpointReader:
        """Reads the published checkpoint's key space from Redis (see PublishedState)."""
        return self._ctx.published.read_checkpoint

    @property
    def effect_listeners(self) -> tuple[EffectListener, ...]:
        """Called with each event and its effect, before it is written (read_service.watch).

        The effect is the same whichever replica writes it, and it holds once the checkpoint
        reaches the event's position.
        """
        return self._ctx.effect_listeners

    @effect_listeners.setter
    def effect_listeners(self, listeners: tuple[EffectListener, ...]) -> None:
        self._ctx.effect_listeners = listeners

    @property
    def resolution_listeners(self) -> tuple[Callable[[Sequence[str] | None], None], ...]:
        """Called with the keys an operator's retry or skip of a parked aggregate wrote (read_service.watch)."""
        return self._ctx.resolution_listeners

    @resolution_listeners.setter
    def resolution_listeners(self, listeners: tuple[Callable[[Sequence[str] | None], None], ...]) -> None:
        self._ctx.resolution_listeners = listeners

    @property
    def parked_aggregates(self) -> Mapping[str, ParkedEvent]:
        """The aggregates whose sequences are parked, by aggregate id (aggregate parking)."""
        return self._ctx.published.parked_aggregates

    def changed(self) -> asyncio.Event:
        """An event set the next time the checkpoint moves (see PublishedState.changed)."""
        return self._ctx.published.changed()

    async def wait_for_checkpoint(self, position: int, timeout_s: float) -> bool:
        """Wait until this projector has seen the checkpoint reach `position`; False on timeout."""
        return await self._ctx.published.wait_for_checkpoint(position, timeout_s)

    def status(self) -> ProjectorStatus:
        """A snapshot of the projector's state and counters."""
        return snapshot(self._ctx)

    # -- the applying lease (read_service.lease) -------------------------------------------------

    def _keep_lease(self) -> None:
        if self._lease is not None and self._lease_keeper is None:
            self._lease_keeper = asyncio.create_task(self._lease.run(), name=f"lease:{self._ctx.name}")

    async def _release_lease(self) -> None:
        keeper, self._lease_keeper = self._lease_keeper, None
        if keeper is None or self._lease is None:
            return
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        # Given up at once rather than left to expire, so that a follower takes over in milliseconds.
        with contextlib.suppress(*TRANSIENT_ERRORS):
            await asyncio.wait_for(self._lease.release(), self._ctx.options.subscribe_timeout_s)

    def _follower(self) -> Follower:
        lease = self._lease
        assert lease is not None
        ctx = self._ctx

        def following() -> None:
            ctx.state = ProjectorState.FOLLOWING
            ctx.session_caught_up = True

        async def read_checkpoint() -> int:
            return await ctx.store.checkpoint()

        checkpoint_key: Callable[[], str] = lambda: ctx.projection.checkpoint_key  # noqa: E731
        return Follower(
            ctx.name,
            lease,
            ctx.client,
            ctx.pool,
            ctx.published,
            hooks=FollowerHooks(
                checkpoint_key=checkpoint_key,
                read_checkpoint=read_checkpoint,
                follow_keyspace=self._keyspace.follow,
                check_keyspace=self._session.probe.check,
                holder_parked=self._keyspace.holder_parked,
                observe_checkpoint=ctx.observe_checkpoint,
                set_ready=ctx.set_ready,
                following=following,
            ),
            probe_interval_s=ctx.options.probe_interval_s,
            ping_interval_s=ctx.options.ping_interval_s,
            transient_errors=TRANSIENT_ERRORS,
        )
