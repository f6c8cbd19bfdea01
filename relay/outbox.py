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


# One statement, so one round trip and an implicit transaction: lock the relay_state row,
# check the fence, position the oldest unpositioned rows after its last_position, advance it.
#
# - `state` takes the row lock first: `batch` reads it through an InitPlan, and the final
#   SELECT reads it too, so it is materialized once. A second claimer (a relay that lost
#   its lock but does not know yet) waits there; under READ COMMITTED it then gets the row
#   as the first one committed it, and `batch` skips the rows the first one positioned
#   (FOR UPDATE re-checks `position IS NULL` on their latest version). Positions stay
#   gap-free and unique: they are numbered after the locking, from the current last_position.
# - The state row is locked only when the statement's snapshot has an unpositioned row: a
#   wake-up that finds nothing (most polls) takes no lock and writes nothing.
# - Claim by status, never by "id > last id": ids are taken at insert but become visible at
#   commit, so a lower id may commit after a higher one was already read. Positions follow
#   id order within the batch.
#
# Rows: none when there was nothing to claim; otherwise one per claimed event, each with
# `leader`, or a single row with `leader` and NULL event columns when nothing was claimed.
_CLAIM = f"""
WITH state AS (
    SELECT last_position,
           ($1::integer IS NULL OR EXISTS (
                SELECT 1 FROM pg_locks
                WHERE locktype = 'advisory' AND granted AND pid = $1::integer
                  AND classid = $2::bigint::oid AND objid = $3::bigint::oid AND objsubid = 1
           )) AS leader
    FROM relay_state
    WHERE singleton AND EXISTS (SELECT 1 FROM outbox WHERE position IS NULL)
    FOR UPDATE
), batch AS (
    SELECT id FROM outbox
    WHERE position IS NULL AND (SELECT leader FROM state)
    ORDER BY id
    LIMIT $4
    FOR UPDATE
), numbered AS (
    SELECT id AS claimed_id,
           (SELECT last_position FROM state) + row_number() OVER (ORDER BY id) AS new_position
    FROM batch
), claimed AS (
    UPDATE outbox
    SET position = numbered.new_position, positioned_at = now()
    FROM numbered
    WHERE outbox.id = numbered.claimed_id
    RETURNING {ENVELOPE_COLUMNS}
), advanced AS (
    UPDATE relay_state
    SET last_position = (SELECT max(position) FROM claimed)
    WHERE singleton AND EXISTS (SELECT 1 FROM claimed)
)
SELECT state.leader, claimed.* FROM state LEFT JOIN claimed ON true
"""  # noqa: S608 - ENVELOPE_COLUMNS is a constant

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
# (last_position is NULL only when relay_state has no row at all.)
_PUBLISHED_HEAD = """
SELECT
    (SELECT min(position) - 1 FROM outbox WHERE position IS NOT NULL AND published_at IS NULL) AS before_unpublished,
    (SELECT last_position FROM relay_state WHERE singleton) AS last_position
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
    rows = await conn.fetch(
        _CLAIM,
        fence.pid if fence else None,
        fence.classid if fence else 0,
        fence.objid if fence else 0,
        limit,
    )
    if not rows:
        return []
    if not rows[0]["leader"]:
        raise LeadershipLost("the lock session no longer holds the relay lock")
    # RETURNING has no defined order; a claim that found nothing is one row without an event.
    return sorted((envelope_from_row(row) for row in rows if row["position"] is not None), key=lambda e: e.position)


async def stranded_batch(conn: Connection, limit: int) -> list[EventEnvelope]:
    """Rows that got a position but were never marked published (a crash or a failed publish)."""
    rows = await conn.fetch(_STRANDED, limit)
    return [envelope_from_row(row) for row in rows]


async def mark_published(conn: Connection, first: int, last: int) -> None:
    """Set published_at on the unpublished rows at positions `first`..`last`, in one statement."""
    await conn.execute(_MARK_PUBLISHED, first, last)


async def published_head(conn: Connection) -> int:
    """The highest position below which every event has been published.

    Read when a relay starts to lead, so it is also where a database without relay_state's
    row is refused: the claim itself would just find nothing to do, forever.
    """
    row = await conn.fetchrow(_PUBLISHED_HEAD)
    if row is None or row["last_position"] is None:
        raise RuntimeError("relay_state has no row; were the migrations applied?")
    before_unpublished = row["before_unpublished"]
    return int(row["last_position"] if before_unpublished is None else before_unpublished)
