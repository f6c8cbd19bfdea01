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


def sparse_segments(items: Sequence[tuple[int, Sequence[Op]]], first: int, through: int) -> list[Segment]:
    """The segments of positions `first`..`through`, where only `items` (in order) may have ops.

    Every position between the items is an event the projection does not handle (the log read
    left it out): it rides along with the next item that writes, or with a trailing marker.
    """
    result: list[Segment] = []
    start = first
    for position, ops in items:
        if ops:
            result.append(Segment(start, position, ops))
            start = position + 1
    last = max(through, items[-1][0] if items else 0)
    if start <= last:
        result.append(Segment(start, last))
    return result


def _refused(moves: Sequence[tuple[int, int]], positions: Sequence[int]) -> int:
    """How many of `positions` (ascending) the calls that made `moves` found applied already.

    A position at or below the checkpoint a call started from was applied before it: by an
    earlier write, or by another writer between two calls of this one.
    """
    refused = 0
    call = 0
    for position in positions:
        while call + 1 < len(moves) and position > moves[call][1]:
            call += 1
        if position <= moves[call][0]:
            refused += 1
    return refused


class BatchApplier:
    """Projects and writes runs of events for one projection; see the module docstring."""

    def __init__(self, ctx: ProjectionContext, parking: Parking) -> None:
        self._ctx = ctx
        self._parking = parking
        self._tracer = ctx.links.tracer or trace.get_tracer("tessera.read_service.projector")

    async def apply(
        self, events: list[EventEnvelope], *, defer: bool = False, covers: tuple[int, int] | None = None
    ) -> int:
        """Apply a run of consecutive events in one script call; return the position seen after it.

        With `defer`, trailing events the projection does not handle are not written yet: they
        become the pending marker (see the module docstring). With `covers` (first, last),
        `events` are every event the projection handles at positions first..last (the log read
        left the others out): the checkpoint moves over the positions between them, and on to
        `last`. The script finds a gap if the checkpoint is below first - 1.
        """
        ctx = self._ctx
        checkpoint, state, sequences = await self._read(events)
        base = max(checkpoint, ctx.pending)
        run = consecutive_after(events, base) if covers is None else [e for e in events if e.position > base]
        if not run and (covers is None or covers[1] <= base):
            return base
        if run:
            ctx.fingerprint = Fingerprint(run[-1].position, run[-1].event_id)
        spans: dict[int, trace.Span] = {}
        try:
            items, poison, error = await self._project(run, state, spans, sequences)
            write = self._deferring(items, checkpoint) if defer and poison is None else len(items)
            written = items[:write]
            if covers is not None:
                # Up to the event the projection stopped at, if any: it is parked right after.
                end = covers[1] if poison is None else poison.position - 1
                await self._write(sparse_segments(written, covers[0], end), written, run, spans)
            else:
                await self._write(segments(written, checkpoint + 1), written, run, spans)
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

    def _deferring(self, items: Sequence[tuple[int, Sequence[Op]]], checkpoint: int) -> int:
        """How many of `items` to write now: trailing no-op events wait, unless the run reaches a batch."""
        write = len(items)
        if items and items[-1][0] - checkpoint < self._ctx.options.batch_size:
            while write and not items[write - 1][1]:
                write -= 1
        return write

    async def _read(
        self, events: Sequence[EventEnvelope]
    ) -> tuple[int, dict[str, bytes | None], ParkedSequences | None]:
        """The checkpoint and the state the handled events need (with aggregate parking, the parked ones too)."""
        ctx = self._ctx
        projection = ctx.projection
        types: frozenset[str] | None = getattr(projection, "handles", None)
        handled = list(events) if types is None else [e for e in events if e.event_type in types]
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
        moves = await ctx.store.write_calls([Segment(ctx.checkpoint + 1, pending)], ctx.fingerprint)
        after = moves[-1][1]
        self._count(moves, [])
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
        batch: Sequence[Segment],
        items: Sequence[tuple[int, Sequence[Op]]],
        run: Sequence[EventEnvelope],
        spans: Mapping[int, trace.Span],
    ) -> None:
        """Write the segments of `items` in one call (or one pipeline of calls); record it."""
        ctx = self._ctx
        if not batch:
            return
        ctx.check_lease()
        moves = await ctx.store.write_calls(batch, ctx.fingerprint)
        before, after = moves[0][0], moves[-1][1]
        if after >= ctx.pending:
            ctx.pending = 0
            ctx.pending_since = 0.0
        self._count(moves, [position for position, _ in items])
        if spans:
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
        # The last event applied that the projection handles (only the last one is kept).
        for envelope in reversed(run):
            if envelope.position <= before:
                break
            if envelope.position <= after and handles(ctx.projection, envelope):
                ctx.counters.last_applied_envelope = envelope
                break
        await ctx.observe_checkpoint(after)

    def _count(self, moves: Sequence[tuple[int, int]], positions: Sequence[int]) -> None:
        """Count what the calls of one write did; each moved the checkpoint from its first value to its second."""
        ctx = self._ctx
        counters = ctx.counters
        before = moves[0][0]
        duplicates = _refused(moves, positions)
        counters.duplicates += duplicates
        if duplicates and ctx.lease is not None:
            # Only another applier moves the checkpoint between our snapshot and our write:
            # two replicas held the lease at once, and the apply script kept the order.
            logger.warning(
                "duplicate apply refused up to position %s: another replica applied it",
                before,
                extra={"projection": ctx.name, "checkpoint": moves[-1][1]},
            )
        applied_at: datetime | None = None
        for first, last in moves:
            if last > first:
                counters.applied += last - first
                applied_at = applied_at or datetime.now(UTC)
                counters.last_applied_at = applied_at
                on_applied = ctx.links.on_applied
                if on_applied is not None:
                    for position in range(first + 1, last + 1):
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
