"""Applying a run of consecutive events to the views: one state read, one script call.

Live apply (read_service.session) and catch-up (read_service.catch_up) both come here. Events
the projection does not handle are not projected: they ride along with the next event that
writes (the apply script moves the checkpoint over them), or, when deferred, become the
*pending marker*, written with the next write, when the stream goes quiet, or when it grows to
a batch. An event the projection cannot apply goes to read_service.parking: with aggregate
parking its aggregate's sequence is parked in the same script call (read_service.sequences).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from opentelemetry import trace

from read_service.applier import handles, project_run
from read_service.context import ParkingMode, ProjectionContext
from read_service.log_guard import Fingerprint
from read_service.parking import Parking
from read_service.projections.base import Op
from read_service.sequences import ParkedSequences
from read_service.view_store import Outcome, Segment, segments
from shared_kernel.contracts.trace_context import context_from_envelope
from tessera.events.v1.envelope_pb2 import EventEnvelope

logger = logging.getLogger(__name__)


def consecutive_after(events: Sequence[EventEnvelope], base: int) -> list[EventEnvelope]:
    """The events at base + 1, base + 2, ... (skipping those at or below `base`), up to the first hole."""
    run: list[EventEnvelope] = []
    for envelope in events:
        if envelope.position <= base:
            continue
        if envelope.position != base + len(run) + 1:
            break
        run.append(envelope)
    return run


class BatchApplier:
    """Projects and writes runs of events for one projection; see the module docstring."""

    def __init__(self, ctx: ProjectionContext, parking: Parking) -> None:
        self._ctx = ctx
        self._parking = parking
        self._tracer = ctx.links.tracer or trace.get_tracer("tessera.read_service.projector")

    async def apply(self, events: list[EventEnvelope], *, defer: bool = False) -> int:
        """Apply a run of consecutive events in one script call; return the position seen after it.

        With `defer`, trailing events the projection does not handle are not written yet: they
        become the pending marker (see the module docstring).
        """
        ctx = self._ctx
        checkpoint, state, sequences = await self._read(events)
        base = max(checkpoint, ctx.pending)
        run = consecutive_after(events, base)
        if not run:
            return base
        ctx.fingerprint = Fingerprint(run[-1].position, run[-1].event_id)
        spans: dict[int, trace.Span] = {}
        try:
            items, poison, error = await self._project(run, state, spans, sequences)
            write = len(items)
            if defer and poison is None and items and items[-1][0] - checkpoint < ctx.options.batch_size:
                while write and not items[write - 1][1]:
                    write -= 1
            if write:
                await self._write(items[:write], run, spans, first=checkpoint + 1)
            if write < len(items):
                ctx.pending = items[-1][0]
                ctx.pending_since = ctx.pending_since or time.monotonic()
            if poison is not None:
                # Park only now: the events before it are in Redis and the checkpoint right before it.
                await self.flush_marker()
                spans.get(poison.position, trace.INVALID_SPAN).set_attribute("tessera.projection.outcome", "parked")
            for record in () if sequences is None else sequences.parked:
                spans.get(record.position, trace.INVALID_SPAN).set_attribute("tessera.projection.outcome", "parked")
        finally:
            for span in spans.values():
                span.end()
        if poison is not None and error is not None:
            await self._parking.park(poison, error)
        if sequences is not None:
            self._parking.parked_sequences(sequences)
        return ctx.seen()

    async def _read(
        self, events: Sequence[EventEnvelope]
    ) -> tuple[int, dict[str, bytes | None], ParkedSequences | None]:
        """The checkpoint and the state the handled events need (with aggregate parking, the parked ones too)."""
        ctx = self._ctx
        projection = ctx.projection
        handled = [e for e in events if handles(projection, e)]
        keys = list(dict.fromkeys(k for e in handled for k in projection.state_keys(e)))
        if handled and ctx.options.parking is ParkingMode.AGGREGATE:
            # The parked aggregates are read with the state, at the same checkpoint.
            checkpoint, state, parked = await ctx.store.snapshot_parked(keys, self._parking.sequences_key)
            await ctx.observe_checkpoint(checkpoint)
            return checkpoint, state, self._parking.sequences(parked)
        if keys:
            checkpoint, state = await ctx.store.snapshot(keys)
            await ctx.observe_checkpoint(checkpoint)
            return checkpoint, state, None
        # Nothing to read first: the script checks the positions against the checkpoint itself.
        return ctx.checkpoint, {}, None

    async def flush_marker(self) -> None:
        """Write the pending marker: move the checkpoint over the no-op events deferred so far."""
        ctx = self._ctx
        pending, ctx.pending, ctx.pending_since = ctx.pending, 0, 0.0
        if pending <= ctx.checkpoint:
            return
        ctx.check_lease()
        before, after = await ctx.store.write([Segment(ctx.checkpoint + 1, pending)], ctx.fingerprint)
        self._count(before, after, [])
        await ctx.observe_checkpoint(after)

    def marker_due_in(self) -> float | None:
        """Seconds until the pending marker should be written (None when there is none)."""
        ctx = self._ctx
        if ctx.pending <= ctx.checkpoint:
            return None
        return max(ctx.pending_since + ctx.options.marker_delay_s - time.monotonic(), 0.0)

    async def _project(
        self,
        run: Sequence[EventEnvelope],
        state: Mapping[str, bytes | None],
        spans: dict[int, trace.Span],
        sequences: ParkedSequences | None,
    ) -> tuple[list[tuple[int, Sequence[Op]]], EventEnvelope | None, BaseException | None]:
        """Each event's ops, in order, up to the first the projection raises on (returned, with its error)."""
        ctx = self._ctx

        def open_span(envelope: EventEnvelope) -> None:
            if envelope.traceparent:
                # Like the relay, no span for an event without a trace context: a root span per
                # event would be noise, and during a replay making them was a quarter of the work.
                spans[envelope.position] = self._tracer.start_span(
                    f"{ctx.name} project",
                    context=context_from_envelope(envelope.traceparent, envelope.tracestate),
                    kind=trace.SpanKind.CONSUMER,
                    attributes=self._span_attributes(envelope),
                )

        projected = await project_run(
            ctx.projection,
            run,
            dict(state),
            skipped=self._parking.skipped,
            listeners=ctx.effect_listeners,
            before_project=open_span,
            sequences=sequences,
        )
        items = [(envelope.position, effect.ops) for envelope, effect in projected.effects]
        return items, projected.poison, projected.error

    async def _write(
        self,
        items: Sequence[tuple[int, Sequence[Op]]],
        run: Sequence[EventEnvelope],
        spans: Mapping[int, trace.Span],
        *,
        first: int,
    ) -> None:
        """Write `items` (from position `first`, taking pending no-op events along) in one call; record it."""
        ctx = self._ctx
        ctx.check_lease()
        before, after = await ctx.store.write(segments(items, first), ctx.fingerprint)
        if after >= ctx.pending:
            ctx.pending = 0
            ctx.pending_since = 0.0
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
            if before < envelope.position <= after and handles(ctx.projection, envelope):
                ctx.counters.last_applied_envelope = envelope
        await ctx.observe_checkpoint(after)

    def _count(self, before: int, after: int, positions: Sequence[int]) -> None:
        ctx = self._ctx
        counters = ctx.counters
        duplicates = sum(1 for position in positions if position <= before)
        counters.duplicates += duplicates
        if duplicates and ctx.lease is not None:
            # Only another applier moves the checkpoint between our snapshot and our write:
            # two replicas held the lease at once, and the apply script kept the order.
            logger.warning(
                "duplicate apply refused up to position %s: another replica applied it",
                before,
                extra={"projection": ctx.name, "checkpoint": after},
            )
        if after > before:
            counters.applied += after - before
            counters.last_applied_at = datetime.now(UTC)
            on_applied = ctx.links.on_applied
            if on_applied is not None:
                for position in range(before + 1, after + 1):
                    on_applied(position)

    def _span_attributes(self, envelope: EventEnvelope) -> dict[str, str | int]:
        return {
            "messaging.system": "redis",
            "messaging.destination.name": self._ctx.source.events_channel,
            "messaging.message.id": envelope.event_id,
            "tessera.event.type": envelope.event_type,
            "tessera.event.position": envelope.position,
            "tessera.projection": self._ctx.name,
        }
