"""The outbox table contract: how events are appended, and how the event log is read back.

The write service appends events to `outbox_event` in the command's transaction (a
trigger queues each one's id in `outbox_pending`). The relay assigns gap-free positions
(`outbox_position`) and publishes. Read replicas read positioned events back in position
order through the `outbox` view (an event with its position, NULL until it has one) to
catch up and to rebuild views. All three go through this module, so the log's shape is
known in one place (migrations/0006).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from shared_kernel.contracts.trace_context import current_trace_context
from tessera.events.v1.envelope_pb2 import EventEnvelope

# Postgres channel the outbox trigger notifies on commit (see migrations/0001).
OUTBOX_NOTIFY_CHANNEL = "outbox_inserted"


def events_channel(prefix: str) -> str:
    """Redis pub/sub channel that carries serialized EventEnvelopes."""
    return f"{prefix}events"


def head_channel(prefix: str) -> str:
    """Redis pub/sub channel that carries the relay's StreamHead heartbeats."""
    return f"{prefix}events:head"


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event a command produced, before it is written to the outbox."""

    payload: Message
    aggregate_type: str
    aggregate_id: str
    aggregate_version: int
    occurred_at: datetime
    schema_version: int = 1
    event_id: uuid.UUID = field(default_factory=uuid.uuid4)

    @property
    def event_type(self) -> str:
        """Full protobuf name of the payload message."""
        name: str = self.payload.DESCRIPTOR.full_name
        return name


_INSERT = """
INSERT INTO outbox_event (event_id, event_type, schema_version, aggregate_type, aggregate_id,
                    aggregate_version, payload, occurred_at, correlation_id, causation_id,
                    traceparent, tracestate)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
"""


async def append_events(
    conn: asyncpg.Connection[Any] | asyncpg.pool.PoolConnectionProxy[Any],
    events: Sequence[NewEvent],
    *,
    correlation_id: str,
    causation_id: str,
) -> None:
    """Insert events into the outbox on `conn`, inside the caller's transaction."""
    if not events:
        return
    traceparent, tracestate = current_trace_context()
    await conn.executemany(
        _INSERT, [_outbox_row(e, correlation_id, causation_id, traceparent, tracestate) for e in events]
    )


# The same insert for any number of events as one statement (arrays, so its text never
# changes): the write service sends it as one step of a command's single write statement,
# and commands written together add their events to the same step. Every column is an
# array, so each event keeps its own command's correlation, causation and trace context;
# ids are taken in the arrays' order, which is each aggregate's version order (the relay
# positions by id).
_INSERT_ROWS = """
INSERT INTO outbox_event (event_id, event_type, schema_version, aggregate_type, aggregate_id,
                    aggregate_version, payload, occurred_at, correlation_id, causation_id,
                    traceparent, tracestate)
SELECT e.event_id, e.event_type, e.schema_version, e.aggregate_type, e.aggregate_id,
       e.aggregate_version, e.payload, e.occurred_at, e.correlation_id, e.causation_id, e.traceparent, e.tracestate
FROM unnest($1::uuid[], $2::text[], $3::int[], $4::text[], $5::text[], $6::bigint[], $7::bytea[],
            $8::timestamptz[], $9::text[], $10::text[], $11::text[], $12::text[]) WITH ORDINALITY
     AS e (event_id, event_type, schema_version, aggregate_type, aggregate_id, aggregate_version, payload,
           occurred_at, correlation_id, causation_id, traceparent, tracestate, n)
ORDER BY e.n
"""


def outbox_insert(
    events: Sequence[NewEvent], *, correlation_id: str, causation_id: str
) -> tuple[str, tuple[list[Any], ...]]:
    """One INSERT statement (and its argument arrays) that appends `events` to the outbox.

    `add_outbox_rows` appends more events to the same arrays before the statement is sent.
    """
    args: tuple[list[Any], ...] = tuple([] for _ in range(12))
    add_outbox_rows(args, events, correlation_id=correlation_id, causation_id=causation_id)
    return _INSERT_ROWS, args


def _outbox_row(
    e: NewEvent, correlation_id: str, causation_id: str, traceparent: str, tracestate: str
) -> tuple[Any, ...]:
    """One outbox row's values, in the order of the insert's columns."""
    return (
        e.event_id,
        e.event_type,
        e.schema_version,
        e.aggregate_type,
        e.aggregate_id,
        e.aggregate_version,
        e.payload.SerializeToString(),
        e.occurred_at,
        correlation_id,
        causation_id,
        traceparent,
        tracestate,
    )


def add_outbox_rows(
    args: tuple[list[Any], ...], events: Sequence[NewEvent], *, correlation_id: str, causation_id: str
) -> None:
    """Append `events` (with the current trace context) to the argument arrays of an `outbox_insert`."""
    traceparent, tracestate = current_trace_context()
    for e in events:
        row = _outbox_row(e, correlation_id, causation_id, traceparent, tracestate)
        for column, value in zip(args, row, strict=True):
            column.append(value)


# The event id comes back as text and the timestamp as whole microseconds since the epoch:
# building a Timestamp from two integers costs a fraction of converting a datetime, and
# this runs once per event in the relay, in catch-up and in rebuilds.
ENVELOPE_COLUMNS = (
    "event_id::text AS event_id, event_type, schema_version, aggregate_type, aggregate_id, aggregate_version, "
    "position, (extract(epoch FROM occurred_at) * 1000000)::bigint AS occurred_us, correlation_id, causation_id, "
    "traceparent, tracestate, payload"
)


def envelope_from_row(row: asyncpg.Record) -> EventEnvelope:
    """Build the envelope for an outbox row that has a position (selected as ENVELOPE_COLUMNS)."""
    micros: int = row["occurred_us"]
    return EventEnvelope(
        event_id=row["event_id"],
        event_type=row["event_type"],
        schema_version=row["schema_version"],
        aggregate_type=row["aggregate_type"],
        aggregate_id=row["aggregate_id"],
        aggregate_version=row["aggregate_version"],
        position=row["position"],
        correlation_id=row["correlation_id"],
        causation_id=row["causation_id"],
        traceparent=row["traceparent"],
        tracestate=row["tracestate"],
        payload=row["payload"],
        occurred_at=Timestamp(seconds=micros // 1_000_000, nanos=micros % 1_000_000 * 1000),
    )


async def read_positioned(
    conn: asyncpg.Connection[Any] | asyncpg.Pool[Any] | asyncpg.pool.PoolConnectionProxy[Any],
    after: int,
    limit: int,
    up_to: int | None = None,
) -> list[EventEnvelope]:
    """Events with position in (after, up_to], in position order, at most `limit` of them."""
    if up_to is None:
        rows = await conn.fetch(
            f"SELECT {ENVELOPE_COLUMNS} FROM outbox WHERE position > $1 ORDER BY position LIMIT $2",  # noqa: S608
            after,
            limit,
        )
    else:
        rows = await conn.fetch(
            f"SELECT {ENVELOPE_COLUMNS} FROM outbox WHERE position > $1 AND position <= $2 "  # noqa: S608
            "ORDER BY position LIMIT $3",
            after,
            up_to,
            limit,
        )
    return [envelope_from_row(r) for r in rows]


async def head_position(
    conn: asyncpg.Connection[Any] | asyncpg.Pool[Any] | asyncpg.pool.PoolConnectionProxy[Any],
) -> int:
    """The highest position the relay has assigned (0 before the first event)."""
    value = await conn.fetchval("SELECT last_position FROM relay_state WHERE singleton")
    return int(value or 0)


async def first_positions(
    conn: asyncpg.Connection[Any] | asyncpg.Pool[Any] | asyncpg.pool.PoolConnectionProxy[Any],
    aggregate_type: str,
    aggregate_ids: Sequence[str],
) -> list[int]:
    """The positions of the first events (version 1) of these aggregates that have one, found by index."""
    rows = await conn.fetch(
        "SELECT position FROM outbox WHERE aggregate_type = $1 AND aggregate_id = ANY($2::text[]) "
        "AND aggregate_version = 1 AND position IS NOT NULL",
        aggregate_type,
        list(aggregate_ids),
    )
    return [int(r["position"]) for r in rows]
