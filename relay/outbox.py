"""The relay's SQL against the outbox: claim and position rows, find stranded ones, mark them published.

The table's shape and the envelope mapping live in `shared_kernel.event_log`; this module
holds only the statements that belong to the relay's side of the contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

import asyncpg

from shared_kernel.event_log import ENVELOPE_COLUMNS, envelope_from_row
from tessera.events.v1.envelope_pb2 import EventEnvelope

Connection: TypeAlias = "asyncpg.Connection[Any] | asyncpg.pool.PoolConnectionProxy[Any]"


class LeadershipLost(Exception):
    """This relay can no longer prove it holds the advisory lock, so it must stop relaying."""


@dataclass(frozen=True, slots=True)
class Fence:
    """Proof of leadership checked inside the claim: the backend `pid` must hold advisory lock `key`."""

    pid: int
    key: int

    @property
    def classid(self) -> int:
        """High 32 bits of the key, as pg_locks shows a one-bigint advisory lock."""
        return self.key >> 32

    @property
    def objid(self) -> int:
        """Low 32 bits of the key, as pg_locks shows a one-bigint advisory lock."""
        return self.key & 0xFFFFFFFF


_ANY_UNPOSITIONED = "SELECT EXISTS (SELECT 1 FROM outbox WHERE position IS NULL)"

# Locking the single relay_state row first serializes claims: a second claimer (a relay
# that lost its lock but does not know yet) waits here, and its next statement, under
# READ COMMITTED, sees the positions the first one committed.
_LOCK_STATE = """
SELECT last_position,
       ($1::integer IS NULL OR EXISTS (
            SELECT 1 FROM pg_locks
            WHERE locktype = 'advisory' AND granted AND pid = $1::integer
              AND classid = $2::bigint::oid AND objid = $3::bigint::oid AND objsubid = 1
       )) AS leader
FROM relay_state
WHERE singleton
FOR UPDATE
"""

# Claim by status, never by "id > last id": ids are taken at insert but become visible at
# commit, so a lower id may commit after a higher one was already read. Positions follow
# id order within the batch.
_CLAIM = f"""
WITH batch AS (
    SELECT id FROM outbox WHERE position IS NULL ORDER BY id LIMIT $1 FOR UPDATE
), numbered AS (
    SELECT id AS claimed_id, row_number() OVER (ORDER BY id) AS offset_in_batch FROM batch
)
UPDATE outbox
SET position = $2::bigint + numbered.offset_in_batch, positioned_at = now()
FROM numbered
WHERE outbox.id = numbered.claimed_id
RETURNING {ENVELOPE_COLUMNS}
"""  # noqa: S608 - ENVELOPE_COLUMNS is a constant

_ADVANCE = "UPDATE relay_state SET last_position = $1 WHERE singleton"

_STRANDED = f"""
SELECT {ENVELOPE_COLUMNS} FROM outbox
WHERE position IS NOT NULL AND published_at IS NULL
ORDER BY position
LIMIT $1
"""  # noqa: S608 - ENVELOPE_COLUMNS is a constant

# A batch is a run of consecutive positions (a claim hands them out gap-free, and the
# stranded rows are all unpublished ones in position order), so a range names it: one
# index range scan instead of a lookup per position.
_MARK_PUBLISHED = """
UPDATE outbox SET published_at = now()
WHERE position BETWEEN $1 AND $2 AND published_at IS NULL
"""

# Everything up to the first positioned-but-unpublished row has gone out; with none, all has.
_PUBLISHED_HEAD = """
SELECT coalesce(
    (SELECT min(position) - 1 FROM outbox WHERE position IS NOT NULL AND published_at IS NULL),
    (SELECT last_position FROM relay_state WHERE singleton),
    0)
"""


async def claim_batch(conn: Connection, limit: int, fence: Fence | None) -> list[EventEnvelope]:
    """Give the oldest unpositioned rows the next gap-free positions and commit; return them in order.

    With a `fence`, the claim commits only while that backend still holds the relay lock,
    so a relay whose lock session died cannot hand out positions any more.

    Per-aggregate order holds without looking at aggregates: the write side locks the
    aggregate's row for the whole command, so version v+1's outbox row is inserted only
    after version v committed. It has the higher id, and whenever it is visible here so
    is v; v is therefore positioned in the same batch (earlier, by id) or an earlier one.
    """
    # A cheap look first: most polls find nothing, and then no row lock is taken at all.
    if not await conn.fetchval(_ANY_UNPOSITIONED):
        return []
    async with conn.transaction():
        state = await conn.fetchrow(
            _LOCK_STATE,
            fence.pid if fence else None,
            fence.classid if fence else 0,
            fence.objid if fence else 0,
        )
        if state is None:
            raise RuntimeError("relay_state has no row; were the migrations applied?")
        if not state["leader"]:
            raise LeadershipLost("the lock session no longer holds the relay lock")
        last_position: int = state["last_position"]
        rows = await conn.fetch(_CLAIM, limit, last_position)
        if rows:
            await conn.execute(_ADVANCE, last_position + len(rows))
    # RETURNING has no defined order.
    return sorted((envelope_from_row(row) for row in rows), key=lambda e: e.position)


async def stranded_batch(conn: Connection, limit: int) -> list[EventEnvelope]:
    """Rows that got a position but were never marked published (a crash or a failed publish)."""
    rows = await conn.fetch(_STRANDED, limit)
    return [envelope_from_row(row) for row in rows]


async def mark_published(conn: Connection, first: int, last: int) -> None:
    """Set published_at on the unpublished rows at positions `first`..`last`, in one statement."""
    await conn.execute(_MARK_PUBLISHED, first, last)


async def published_head(conn: Connection) -> int:
    """The highest position below which every event has been published."""
    value = await conn.fetchval(_PUBLISHED_HEAD)
    return int(value)
