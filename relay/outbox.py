"""The relay's SQL against the outbox: claim and position rows, record the published watermark.

The table's shape and the envelope mapping live in `shared_kernel.contracts.event_log`; this module
holds only the statements that belong to the relay's side of the contract.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import asyncpg

from shared_kernel.contracts.event_log import ENVELOPE_COLUMNS, envelope_from_row
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


# Settings for the sessions the claim runs on. Without bitmap scans, "the oldest n
# unpositioned rows" can only be read in id order from an index, stopping after n.
# The planner otherwise picks a bitmap scan of every unpositioned row and a sort whenever
# its statistics say few rows are unpositioned, which is what they say in steady state (and
# before the first ANALYZE): then a backlog of a million rows was read and sorted whole for
# every batch, so catching up took time quadratic in the backlog. Nothing else the relay
# runs wants a bitmap scan either (its lookups are by position range or by id).
CLAIM_SESSION_SETTINGS = {"enable_bitmapscan": "off"}


@dataclass(frozen=True, slots=True)
class Claim:
    """What one claim found: where positions stood before it, and the rows it positioned.

    The rows come back as the driver decoded them; their envelopes are built on demand
    (`envelopes`), so a relay can send its next claim before spending CPU on this one's.
    """

    positioned_before: int
    rows: list[asyncpg.Record]

    @property
    def count(self) -> int:
        """Events this claim positioned."""
        return len(self.rows)

    @property
    def last_position(self) -> int:
        """The highest position this claim handed out (`positioned_before` when it claimed nothing).

        The claim numbers its rows from the locked last_position, gap-free, so it need not
        look at them.
        """
        return self.positioned_before + len(self.rows)

    @property
    def envelopes(self) -> list[EventEnvelope]:
        """The claimed events' envelopes, in position order."""
        # RETURNING has no defined order; the positions are positioned_before + 1 … + count.
        ordered: list[EventEnvelope | None] = [None] * len(self.rows)
        for row in self.rows:
            envelope = envelope_from_row(row)
            ordered[envelope.position - self.positioned_before - 1] = envelope
        return cast("list[EventEnvelope]", ordered)


# One statement, so one round trip and an implicit transaction: read the oldest ids waiting
# for a position, lock the relay_state row, check the fence, take the ids off the queue,
# give them the positions after its last_position, advance it, and record the published
# watermark the caller passes ($4, NULL: leave it).
#
# - Positions go to the narrow `outbox_position` (id, position); the event's own row in
#   `outbox_event` is never rewritten (decision 0040). Rewriting it (a new version of the
#   whole event, an entry in each of its three indexes) was most of a drain's Postgres CPU.
# - `batch` reads the oldest ids of `outbox_pending` in the statement's snapshot, once: it
#   is the only walk of the queue. Ids a claim dequeued stay in the queue's index until a
#   vacuum removes them, and a vacuum (or an index scan marking them dead) can only do so
#   once no transaction on the server is older than the claim: while one is (a long report,
#   an idle session in a transaction, in any database of the server), every walk steps over
#   every id dequeued since, so each walk costs time in proportion to the drain so far. A
#   second walk (a look for any waiting id before locking) doubled that (decision 0038).
# - `state` locks the row only when `batch` found something: a wake-up that finds nothing
#   (most polls) takes no lock and writes nothing; it still reads last_position (`seen`),
#   so the caller sees positions it has not published.
# - A second claimer (a relay that lost its lock but does not know yet) waits at the lock,
#   and under READ COMMITTED then gets the row as the first one committed it, while the rest
#   of its statement still reads its older snapshot, in which the ids the first one
#   dequeued are still queued. `numbered` therefore keeps the batch only when the locked
#   last_position equals the snapshot's (`seen`): every claim advances last_position, so
#   equal values mean no claim committed in between, and the snapshot's queued ids are
#   still queued. Otherwise it claims nothing (and the caller sees the other claim's
#   positions in `positioned_before`). Should two claims ever number the same event, the
#   primary key of outbox_position refuses the second; two events never share a position
#   (its unique key).
# - Positions stay gap-free and unique: they are numbered from the locked last_position.
# - Claim by status, never by "id > last id": ids are taken at insert but become visible at
#   commit, so a lower id may commit after a higher one was already read. The queue's row
#   commits with its event (a trigger writes it in the same statement). Positions follow id
#   order within the batch.
# - The watermark rides along with the position update (the relay_state row is written
#   anyway), so a drain writes relay_state once per batch.
#
# - The plan must not depend on the planner's guesses: asyncpg prepares the statement, and
#   after a few runs Postgres plans it once for any parameters. Generic plans once joined a
#   claim's rows by scanning the whole outbox on every claim, and answered "is anything
#   unpositioned?" (an EXISTS on the table) by reading the table from its start. The
#   batch's ids as an array make the dequeue and the read of the events look their rows up
#   by primary key; the oldest queued ids in id order come from the queue's primary key.
#   The batch size is part of the text, so the planner also knows how many rows to expect.
#
# Rows: one per claimed event, or a single row with NULL event columns when nothing was
# claimed; `positioned_before` is last_position before this claim (NULL: no relay_state
# row), `leader` is NULL when nothing was there to claim.
_CLAIM = f"""
WITH batch AS (
    SELECT id FROM outbox_pending
    ORDER BY id
    LIMIT {{limit}}
), seen AS (
    SELECT last_position FROM relay_state WHERE singleton
), state AS (
    SELECT last_position,
           ($1::integer IS NULL OR EXISTS (
                SELECT 1 FROM pg_locks
                WHERE locktype = 'advisory' AND granted AND pid = $1::integer
                  AND classid = $2::bigint::oid AND objid = $3::bigint::oid AND objsubid = 1
           )) AS leader
    FROM relay_state
    WHERE singleton AND EXISTS (SELECT 1 FROM batch)
    FOR UPDATE
), numbered AS (
    SELECT id AS claimed_id,
           (SELECT last_position FROM state) + row_number() OVER (ORDER BY id) AS position
    FROM batch
    WHERE (SELECT leader FROM state)
      AND (SELECT last_position FROM state) = (SELECT last_position FROM seen)
), dequeued AS (
    DELETE FROM outbox_pending
    WHERE id = ANY (ARRAY(SELECT claimed_id FROM numbered))
), positioned AS (
    INSERT INTO outbox_position (outbox_id, position)
    SELECT claimed_id, position FROM numbered
), claimed AS (
    SELECT {ENVELOPE_COLUMNS}
    FROM numbered
    JOIN outbox_event ON outbox_event.id = numbered.claimed_id
    WHERE outbox_event.id = ANY (ARRAY(SELECT claimed_id FROM numbered))
), advanced AS (
    UPDATE relay_state
    SET last_position = (SELECT max(position) FROM numbered),
        published_position = greatest(published_position, $4::bigint)
    WHERE singleton AND EXISTS (SELECT 1 FROM numbered)
)
SELECT coalesce(state.last_position, (SELECT last_position FROM seen)) AS positioned_before,
       state.leader, claimed.*
FROM (VALUES (true)) AS one (always)
LEFT JOIN state ON true
LEFT JOIN claimed ON true
"""  # noqa: S608 - ENVELOPE_COLUMNS is a constant; the limit an int


@functools.cache
def _claim_statement(limit: int) -> str:
    return _CLAIM.format(limit=int(limit))


# Never moves back: a relay that was deposed without knowing it may still record what it
# published, and that is true too (each relay only records a run of positions it published
# contiguously from a watermark it read).
_RECORD_WATERMARK = """
UPDATE relay_state SET published_position = $1
WHERE singleton AND published_position < $1
"""

_PUBLISHED = "SELECT published_position FROM relay_state WHERE singleton"


async def claim_batch(conn: Connection, limit: int, fence: Fence | None, published: int | None = None) -> Claim:
    """Give the oldest unpositioned rows the next gap-free positions and commit; return them in order.

    With a `fence`, the claim commits only while that backend still holds the relay lock,
    so a relay whose lock session died cannot hand out positions any more. `published`,
    when given, is recorded as the published watermark in the same statement (only when
    rows were claimed: a claim that finds nothing writes nothing).

    Per-aggregate order holds without looking at aggregates: the write side locks the
    aggregate's row for the whole command, so version v+1's outbox row is inserted only
    after version v committed. It has the higher id, and whenever it is visible here so
    is v; v is therefore positioned in the same batch (earlier, by id) or an earlier one.
    """
    rows = await conn.fetch(
        _claim_statement(limit),
        fence.pid if fence else None,
        fence.classid if fence else 0,
        fence.objid if fence else 0,
        published,
    )
    first = rows[0]
    if first["positioned_before"] is None:
        raise RuntimeError("relay_state has no row; were the migrations applied?")
    if first["leader"] is False:
        raise LeadershipLost("the lock session no longer holds the relay lock")
    # A claim that found nothing is one row without an event.
    claimed = rows if first["position"] is not None else []
    return Claim(int(first["positioned_before"]), claimed)


async def record_watermark(conn: Connection, position: int) -> None:
    """Record that every position up to `position` has been published (the watermark never moves back)."""
    await conn.execute(_RECORD_WATERMARK, position)


async def published_head(conn: Connection) -> int:
    """The published watermark: every position up to it has been published.

    Read when a relay starts to lead, so it is also where a database without relay_state's
    row is refused: the claim itself would just find nothing to do, forever.
    """
    value = await conn.fetchval(_PUBLISHED)
    if value is None:
        raise RuntimeError("relay_state has no row; were the migrations applied?")
    return int(value)
