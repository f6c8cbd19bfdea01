"""Notice when the event log went back under the views, as a Postgres failover can make it.

With asynchronous replication the last commits of a lost primary may never reach the
standby that replaces it. The relay may already have published their positions, and the
views applied them. The promoted standby then hands the same positions out again, to other
events; a replica whose checkpoint is already past them takes the new events for duplicates
and skips them, and keeps serving the ones that no longer exist.

To notice, every write of the views also records a fingerprint: one position the writer
has seen (the last of the run it wrote) and the id of the event that held it. The log
guard asks Postgres, in one statement, for the log's head and for the id at that position:
if the head is now below it, or another event holds it, the log was rewound and the views
must be rebuilt from the log as it is now. (Read from a standby, a head below the position
is only replication lag and is not taken for a rewind.) The replica checks at every catch-up, on its
periodic probe, and whenever the stream repeats positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

# {head, the id of the event at $1, whether this server is a standby}: one round trip.
_CHECK = """
SELECT (SELECT last_position FROM relay_state WHERE singleton) AS head,
       (SELECT event_id::text FROM outbox WHERE position = $1) AS event_id,
       pg_is_in_recovery() AS standby
"""


def fingerprint_key(checkpoint_key: str) -> str:
    """The key holding a key space's fingerprint: beside its checkpoint (same hash tag, same slot)."""
    return f"{checkpoint_key}:fingerprint"


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """The event a writer saw at a position, as stored beside the checkpoint."""

    position: int
    event_id: str

    def encode(self) -> str:
        """`position:event_id`."""
        return f"{self.position}:{self.event_id}"

    @classmethod
    def decode(cls, raw: bytes | str | None) -> Fingerprint | None:
        """The stored fingerprint, or None when there is none (or it is unreadable)."""
        if raw is None:
            return None
        text = raw.decode() if isinstance(raw, bytes) else raw
        position, _, event_id = text.partition(":")
        if not position.isdigit() or not event_id:
            return None
        return cls(int(position), event_id)


class LogRewound(Exception):
    """The event log no longer holds an event the views were written from."""

    def __init__(self, fingerprint: Fingerprint, head: int, found: str | None) -> None:
        """Describe what the views saw and what the log holds now."""
        if head < fingerprint.position:
            what = f"the log's head is {head}, below position {fingerprint.position} which the views saw"
        else:
            what = (
                f"position {fingerprint.position} now holds event {found or 'nothing'}, "
                f"not {fingerprint.event_id} which the views saw"
            )
        super().__init__(f"event log rewound under the views: {what}")
        self.fingerprint = fingerprint
        self.head = head
        self.found = found


async def check_log(pool: asyncpg.Pool[Any] | asyncpg.Connection[Any], fingerprint: Fingerprint | None) -> int:
    """Raise LogRewound when the log no longer holds `fingerprint`'s event; return the log's head."""
    position = fingerprint.position if fingerprint is not None else 0
    row = await pool.fetchrow(_CHECK, position)
    head = int(row["head"] or 0) if row is not None else 0
    if fingerprint is None:
        return head
    found = row["event_id"] if row is not None else None
    if found is None and row is not None and row["standby"]:
        # A standby that replays behind the views has simply not got there yet; it never
        # holds another event at a position, unless the log really went back.
        return head
    if head < fingerprint.position or found != fingerprint.event_id:
        raise LogRewound(fingerprint, head, found)
    return head
