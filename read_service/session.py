"""One connected session of a projection: subscribe, catch up, then apply live events.

Live events arrive on Redis pub/sub, which is at-most-once; the Postgres event log is the
durable source. So a session subscribes first (the event source buffers what arrives), catches
up from the log to its head (read_service.catch_up), then applies live events. An event is
applied only when its position is the checkpoint + 1 (decision 0004): a lower position is a
duplicate, a higher one reveals a gap and triggers another catch-up, as does a StreamHead
heartbeat ahead of what was seen, a re-subscription after a silent reconnect, or an overflow of
the inbox. Live events that queued up are applied together (read_service.batches). Errors
talking to Redis or Postgres end the session; the runner then reconnects.
"""

from __future__ import annotations

import asyncio
import collections
import logging

from read_service.batches import BatchApplier
from read_service.catch_up import CatchUp
from read_service.context import ProjectionContext
from read_service.event_source import Inbound, Kind, Subscriber
from read_service.keyspace import KeySpace
from read_service.parking import Parking
from read_service.probe import Probe
from read_service.rewind import RewindGuard
from shared_kernel.platform.runtime import cancel_and_wait
from tessera.events.v1.envelope_pb2 import EventEnvelope

logger = logging.getLogger(__name__)


class Session:
    """Runs one session of a projection until it fails or is cancelled; see the module docstring."""

    def __init__(self, ctx: ProjectionContext, keyspace: KeySpace, parking: Parking) -> None:
        self._ctx = ctx
        self._keyspace = keyspace
        self.parking = parking
        self.batches = BatchApplier(ctx, self.parking)
        self.guard = RewindGuard(ctx, keyspace)
        self.catch_up = CatchUp(ctx, self.batches, self.guard)
        self.probe = Probe(ctx, self.parking, self.guard)
        self._subscriber: Subscriber | None = None
        # The highest position the stream has delivered in this session.
        self._delivered = 0

    async def run(self) -> None:
        """Subscribe, catch up, and apply live events until something ends the session."""
        ctx = self._ctx
        self._delivered = 0
        await ctx.store.load_script()
        replaces = await self._keyspace.choose()
        await self.parking.load()
        probe: asyncio.Task[None] | None = None
        ctx.pending = 0
        # Catch-up must not start before the subscription is live, or events published in
        # between would be in neither the log read nor the inbox: subscribe() returns once it is.
        subscriber = await ctx.source.subscribe()
        self._subscriber = subscriber
        inbox = subscriber.inbox
        try:
            await self.catch_up.run(target=0, building=replaces is not None)
            if replaces is not None:
                await self._keyspace.finish_build(replaces)
            probe = asyncio.create_task(self.probe.watch(inbox))
            ctx.session_caught_up = True
            held: collections.deque[Inbound] = collections.deque()
            while True:
                item = held.popleft() if held else await self._next(inbox)
                if item is None:
                    await self.batches.flush_marker()
                    continue
                if item.kind is Kind.EVENT and not inbox.empty():
                    await self._handle_events(self._take_events(item, inbox, held))
                else:
                    await self._handle(item)
        finally:
            ctx.source.unsubscribe(subscriber)
            if probe is not None:
                await cancel_and_wait([probe], wait_s=0.5, attempts=5)

    async def _next(self, inbox: asyncio.Queue[Inbound]) -> Inbound | None:
        """The next message; None when the pending marker is due first (the stream went quiet)."""
        due = self.batches.marker_due_in()
        if due is None or not inbox.empty():
            return await inbox.get()
        if due <= 0:
            return None
        try:
            return await asyncio.wait_for(inbox.get(), due)
        except TimeoutError:
            return None

    async def _handle(self, item: Inbound) -> None:
        ctx = self._ctx
        if item.kind is Kind.FAILED:
            assert item.error is not None
            raise item.error
        if item.kind is Kind.RETRY:
            await self.parking.resume(self.catch_up)
            return
        if item.kind is Kind.EVENT:
            await self._handle_events([item])
        elif item.kind is Kind.HEAD:
            ctx.counters.head = max(ctx.counters.head, item.head)
            if item.head > ctx.seen() and not ctx.is_parked():
                await self.catch_up.run(target=item.head)
            elif item.head > ctx.checkpoint:
                # Everything up to the head was seen; only the marker is left to write.
                await self.batches.flush_marker()
        else:
            if item.kind is Kind.OVERFLOW and self._subscriber is not None:
                self._subscriber.overflowed = False
            else:
                # Redis dropped the subscription (a restart, or this replica was too slow to
                # read) and the client re-subscribed: whatever was published meanwhile is lost.
                logger.warning(
                    "pub/sub subscription was re-established; catching up from the event log",
                    extra={"projection": ctx.name, "checkpoint": ctx.checkpoint},
                )
            await self.catch_up.run(target=0)

    def _take_events(
        self, first: Inbound, inbox: asyncio.Queue[Inbound], held: collections.deque[Inbound]
    ) -> list[Inbound]:
        """`first` and the events queued right behind it (up to a batch); a non-event stops the run and is held."""
        run = [first]
        while len(run) < self._ctx.options.batch_size and not inbox.empty():
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
            await self.on_events(envelopes)
            envelopes = []
            logger.warning("undecodable message on the events channel; catching up")
            await self.catch_up.run(target=0)
        await self.on_events(envelopes)

    async def on_events(self, envelopes: list[EventEnvelope]) -> None:
        """Apply live events that queued up behind each other together, as catch-up does.

        A replica that falls behind (a burst after a relay failover, a busy machine) then
        catches up at batch speed: one state read and one script call for the batch.
        """
        ctx = self._ctx
        if not envelopes:
            return
        highest = max(e.position for e in envelopes)
        ctx.counters.head = max(ctx.counters.head, highest)
        delivered_before, self._delivered = self._delivered, max(self._delivered, highest)
        if ctx.is_parked():
            return
        seen = ctx.seen()
        if len(envelopes) == 1 and envelopes[0].position > seen + 1:
            await self.catch_up.run(target=highest)
            return
        # A relay re-publish can repeat positions: keep one envelope per position, in order.
        fresh = sorted({e.position: e for e in envelopes if e.position > seen}.values(), key=lambda e: e.position)
        if len(fresh) < len(envelopes):
            # A position the stream delivered before is a repeat (a relay re-publishing, or a
            # log that went back under a failover); one that catch-up applied from the log just
            # before its live copy arrived is not counted. Either way the log is checked.
            repeated = sum(1 for e in envelopes if e.position <= min(seen, delivered_before))
            ctx.counters.duplicates += repeated + len(envelopes) - len({e.position for e in envelopes})
            await self.guard.check()
        # The batch starts from the checkpoint in Redis, which another replica sharing the
        # views may have moved past ours; a gap before or inside the run is left to the log.
        if fresh and await self.batches.apply(fresh, defer=True) < highest:
            await self.catch_up.run(target=highest)
