"""Events a projection cannot apply: park them, and go on once an operator says so (decision 0029).

Aggregate parking (PARKING_MODE=aggregate, the default): the event's aggregate is parked in the
same script call that moves the checkpoint over it (read_service.sequences), and every later
event of that aggregate is held behind it; the rest of the projection goes on. An operator's
retry or skip (`python -m read_service.admin retry|skip`) is a request in Redis; the probe
notices it and the session settles it between two batches: the aggregate's held events are read
back from the log and projected again in order (a skip first drops the parked event, through the
skip record a rebuild honours too), and their ops, with the record's update or removal, are
written in one script call that checks nothing moved meanwhile. The views then equal a rebuild.

Projection parking (PARKING_MODE=projection): the event stops the whole projection; nothing at
or after it is applied until an operator skips it or the checkpoint moves past it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from read_service.applier import handles, parked_record, project_run
from read_service.context import ParkingMode, ProjectionContext, ProjectorState
from read_service.generations import ParkedEvent
from read_service.projections.base import Op
from read_service.sequences import (
    ParkedSequences,
    decode_records,
    keyspace_of,
    record_log,
    requests_key,
    sequence_of,
    sequences_key,
)
from read_service.watch import written_keys
from shared_kernel.contracts.event_log import read_positioned
from tessera.events.v1.envelope_pb2 import EventEnvelope

if TYPE_CHECKING:
    from read_service.catch_up import CatchUp

logger = logging.getLogger(__name__)


class Parking:
    """Parks events of one projection and settles operators' requests; see the module docstring."""

    def __init__(self, ctx: ProjectionContext) -> None:
        self._ctx = ctx
        # Parks already logged and counted, as (generation, position): one found again is not new.
        self._logged: set[tuple[str, int]] = set()

    @property
    def by_aggregate(self) -> bool:
        """True with aggregate parking."""
        return self._ctx.options.parking is ParkingMode.AGGREGATE

    @property
    def sequences_key(self) -> str:
        """The parked hash of the key space written now."""
        ctx = self._ctx
        return sequences_key(keyspace_of(ctx.projection.checkpoint_key, ctx.name), ctx.name)

    @property
    def requests_key(self) -> str:
        """The hash of operators' requests of the key space written now."""
        ctx = self._ctx
        return requests_key(keyspace_of(ctx.projection.checkpoint_key, ctx.name), ctx.name)

    async def load(self) -> None:
        """Publish the parked aggregates of the key space (at the start of a session, or to follow)."""
        if self.by_aggregate:
            self.sequences(await self._ctx.client.hgetall(self.sequences_key))

    def sequences(self, raw: Mapping[Any, Any]) -> ParkedSequences:
        """The parked aggregates read from Redis (published), for a run of events to go through."""
        ctx = self._ctx
        records = decode_records(raw)
        self._publish(records)
        return ParkedSequences(self.sequences_key, ctx.projection, ctx.generation or "", dict(records))

    def _publish(self, records: Mapping[str, ParkedEvent], *, settled_here: bool = False) -> None:
        """Publish the parked sequences; a sequence settled by another process changed unknown keys."""
        published = self._ctx.published
        before = published.parked_sequences
        published.publish_parked_aggregates(records)
        if settled_here:
            return
        if any(field not in records or records[field].position != old.position for field, old in before.items()):
            # Another replica (or the holder, for a follower) settled it: its keys are not known
            # here, so near caches and watches start over.
            for listener in self._ctx.resolution_listeners:
                listener(None)

    def parked_sequences(self, sequences: ParkedSequences) -> None:
        """After a run's write: publish the parked aggregates, log and count those it parked."""
        ctx = self._ctx
        self._publish(sequences.records)
        for record in sequences.parked:
            if (record.generation, record.position) in self._logged:
                continue
            self._logged.add((record.generation, record.position))
            ctx.counters.poison_events += 1
            logger.error(
                "aggregate %s/%s parked at position %s: %s; its later events wait behind it, the rest goes on",
                record.aggregate_type,
                record.aggregate_id,
                record.position,
                record.error,
                extra=_fields(record),
            )

    async def skipped(self, envelope: EventEnvelope, exc: BaseException) -> bool:
        """Whether an operator skipped the event the projection raised on (it then changes nothing)."""
        ctx = self._ctx
        skip = await ctx.meta.skipped(envelope.position)
        if skip is None:
            return False
        logger.warning(
            "applying nothing for the event at position %s: an operator skipped it",
            envelope.position,
            extra={"projection": ctx.name, "skip": skip, "error": str(exc)},
        )
        return True

    async def park(self, envelope: EventEnvelope, exc: BaseException) -> None:
        """Projection parking: stop the projection at `envelope`; publish, record, log and count it."""
        ctx = self._ctx
        record = parked_record(ctx.name, ctx.generation or "", envelope, exc)
        ctx.parked = record
        ctx.state = ProjectorState.PARKED
        if (record.generation, record.position) not in self._logged:
            self._logged.add((record.generation, record.position))
            ctx.counters.poison_events += 1
            logger.error(
                "projection parked at position %s: %s; nothing after it is applied until an operator skips it",
                record.position,
                record.error,
                extra=_fields(record),
            )
            logger.debug("parked event's traceback", exc_info=exc)
        await ctx.meta.park(record)

    async def may_resume(self, checkpoint: int) -> bool:
        """True when parked work may go on: an operator asked, or another writer moved past it."""
        ctx = self._ctx
        if ctx.published.parked_aggregates:
            return bool(await ctx.client.hlen(self.requests_key))
        parked = ctx.parked
        return parked is not None and (
            checkpoint >= parked.position or await ctx.meta.skipped(parked.position) is not None
        )

    def _current(self) -> ParkedEvent | None:
        # Read through a call: the type checker would keep the narrowing above across the awaits.
        return self._ctx.parked

    async def resume(self, catch_up: CatchUp) -> None:
        """Carry out what may_resume found: settle operators' requests, or go on from the log."""
        ctx = self._ctx
        if self.by_aggregate:
            requests = await ctx.client.hgetall(self.requests_key)
            for field, raw in requests.items():
                await self._settle(_text(field), raw)
            return
        parked = ctx.parked
        if parked is None:
            return
        ctx.parked = None
        await catch_up.run(target=0)
        now = self._current()
        if now is None or now.position != parked.position:
            await ctx.meta.unpark(parked.generation)
            logger.info(
                "resumed after the parked event at position %s",
                parked.position,
                extra={"projection": ctx.name, "checkpoint": ctx.checkpoint},
            )
            if now is not None:
                await ctx.meta.park(now)

    async def _settle(self, field: str, raw_request: bytes | str) -> None:
        """Re-project one parked aggregate's held events from the log; see the module docstring."""
        ctx = self._ctx
        request: dict[str, Any] = json.loads(raw_request)
        parked_key = self.sequences_key
        async with ctx.client.pipeline(transaction=True) as pipe:
            pipe.get(ctx.projection.checkpoint_key)
            pipe.hget(parked_key, field)
            checkpoint_raw, raw = await pipe.execute()
        checkpoint = int(checkpoint_raw or 0)
        if raw is None:
            await self._done(field, request, "nothing was parked")
            return
        record = ParkedEvent.from_json(raw)
        if request.get("action") == "skip" and request.get("position") != record.position:
            await self._done(field, request, f"not skipped: the aggregate is parked at {record.position} now")
            return
        events = await self._held_events(field, record.position, checkpoint)
        projection = ctx.projection
        keys = list(dict.fromkeys(k for e in events if handles(projection, e) for k in projection.state_keys(e)))
        state: dict[str, bytes | None] = {}
        if keys:
            read_at, state = await ctx.store.snapshot(keys)
            if read_at != checkpoint:
                return  # the projection moved on meanwhile: the probe asks again
        projected = await project_run(projection, events, state, skipped=self.skipped)
        ops: list[Op] = [op for _, effect in projected.effects for op in effect.ops]
        still: ParkedEvent | None = None
        if projected.poison is not None and projected.error is not None:
            later = [e for e in events if e.position > projected.poison.position and handles(projection, e)]
            still = replace(
                parked_record(ctx.name, ctx.generation or "", projected.poison, projected.error),
                held=len(later),
                last_position=max(record.last_position, projected.poison.position),
            )
            ops.append(("HSET", parked_key, field, still.to_json()))
        else:
            ops.append(("HDEL", parked_key, field))
        ctx.check_lease()
        expected = raw if isinstance(raw, bytes) else str(raw).encode()
        if not await ctx.store.settle(checkpoint, parked_key, field, expected, ops):
            return  # the checkpoint or the record moved: the probe asks again
        records = dict(ctx.published.parked_sequences)
        records.pop(field, None)
        if still is not None:
            records[field] = still
        self._publish(records, settled_here=True)
        for listener in ctx.resolution_listeners:
            listener(written_keys(ops))
        outcome = "settled" if still is None else f"still parked at {still.position}: {still.error}"
        await self._done(field, request, outcome)

    async def _held_events(self, field: str, first: int, last: int) -> list[EventEnvelope]:
        """The events of sequence `field` in the log at positions first..last, in order.

        A sequence may take events of other aggregates (see read_service.sequences.sequence_of),
        so the range is read and filtered: an operator's request, not a hot path.
        """
        ctx = self._ctx
        projection = ctx.projection
        found: list[EventEnvelope] = []
        after = first - 1
        while after < last:
            batch = await read_positioned(ctx.pool, after, ctx.options.batch_size, up_to=last)
            if not batch:
                break
            found += [e for e in batch if handles(projection, e) and sequence_of(projection, e) == field]
            after = batch[-1].position
        return found

    async def _done(self, field: str, request: dict[str, Any], outcome: str) -> None:
        ctx = self._ctx
        await ctx.client.hdel(self.requests_key, field)
        entry = {**request, "aggregate": field, "outcome": outcome, "done_at": datetime.now(UTC).isoformat()}
        await record_log(ctx.client, ctx.meta.base, ctx.name, entry)
        logger.warning(
            "operator's %s of %s: %s",
            request.get("action"),
            field,
            outcome,
            extra={"projection": ctx.name, "by": request.get("by"), "reason": request.get("reason")},
        )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _fields(record: ParkedEvent) -> dict[str, object]:
    return {
        "projection": record.projection,
        "generation": record.generation,
        "position": record.position,
        "event_id": record.event_id,
        "event_type": record.event_type,
        "aggregate_type": record.aggregate_type,
        "aggregate_id": record.aggregate_id,
        "error": record.error,
    }
