"""What every aggregate shares: an id, a version guarded against lost updates, and recorded events.

Every public event (an integration event, `events.PUBLIC_EVENTS`) raises the version by
one, so `aggregate_version` is the version after the event and an aggregate's public
events are numbered 1, 2, 3, ... without gaps. An event that stays inside the write service
carries the version it happened at and moves nothing.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import ClassVar

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from shared_kernel.contracts.errors import FailedPrecondition
from shared_kernel.contracts.event_log import NewEvent
from write_service.domain.events import is_public

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(moment: datetime) -> Timestamp:
    """A protobuf Timestamp for a datetime (a naive one is taken as UTC, as `Timestamp.FromDatetime` does).

    Built from the whole days, seconds and microseconds since the epoch: the same value as
    `FromDatetime`, at a third of its cost (it runs for every event a command records).
    """
    since = (moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)) - _EPOCH
    return Timestamp(seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1000)


@dataclass(eq=False, kw_only=True)
class Aggregate:
    """Base of the write side's aggregates."""

    # The `aggregate_type` of the aggregate's events and consistency tokens.
    aggregate_type: ClassVar[str]

    id: uuid.UUID
    version: int
    updated_at: datetime
    # Version of the row in storage: 0 until first saved. Guards the save against lost updates.
    stored_version: int = 0
    pending_events: list[NewEvent] = field(default_factory=list, repr=False)

    def require_version(self, expected: int | None) -> None:
        """Refuse a command whose caller expected another version (optimistic concurrency)."""
        if expected is not None and expected != self.version:
            raise FailedPrecondition(
                f"{self.aggregate_type} {self.id} is at version {self.version}, not the expected version {expected}"
            )

    def _record(self, payload: Message, now: datetime, schema_version: int = 1) -> None:
        if is_public(payload):
            self.version += 1
        self.updated_at = now
        self.pending_events.append(
            NewEvent(
                payload=payload,
                aggregate_type=self.aggregate_type,
                aggregate_id=str(self.id),
                aggregate_version=self.version,
                occurred_at=now,
                schema_version=schema_version,
            )
        )
