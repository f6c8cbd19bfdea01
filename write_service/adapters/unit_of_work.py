"""The Postgres unit of work (asyncpg): one transaction for every context's repositories, and stored replies.

A command reads what its rules need (each read one statement, no row locks) and writes
its state, outbox rows, command-log row and stored reply as ONE statement at commit,
guarded by the versions it read (optimistic concurrency; `pg_calls` composes it). Every
call is bounded by the command's deadline: client-side with `asyncio.timeout`, and on the
server too, since asyncpg cancels a statement whose call is cancelled (a lock wait stops
using the server when the caller has given up). Driver errors are translated here, once,
into the project's error types.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import asyncpg

from shared_kernel.contracts import errors
from shared_kernel.contracts.event_log import NewEvent, add_outbox_rows, outbox_insert
from shared_kernel.platform.grpc_errors import to_domain_error
from write_service.adapters.catalog import PostgresProductRepository
from write_service.adapters.orders import PostgresOrderRepository, PostgresSagaHandoff
from write_service.adapters.pg_calls import Calls, Step
from write_service.adapters.users import PostgresUserRepository
from write_service.service_layer.deadline import Deadline
from write_service.service_layer.ports import (
    CommandLogEntry,
    ExpiredKeyPurger,
    IdempotencyScope,
    IdempotencyStore,
    StoredReply,
    UnitOfWork,
)

if TYPE_CHECKING:
    from write_service.adapters.pg_calls import Connection

logger = logging.getLogger(__name__)

# A rollback still gets this long when the command's own time is used up, so the
# connection goes back to the pool clean instead of being torn down.
_ROLLBACK_GRACE_S = 2.0

_INSERT_COMMAND_LOG = """
INSERT INTO command_log (command_id, command_type, aggregate_type, aggregate_id, correlation_id,
                         received_at, completed_at, outcome, status_code, error_message,
                         event_ids, summary, principal, idempotency_key, replay_of)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12::jsonb, $13, $14, $15)
"""

# The rows of several commands written together (decision 0033), as arrays so the text is
# the same for any number of them: each command's event ids travel as one comma-separated
# text (an array of arrays must be rectangular) and its summary as JSON text.
_INSERT_COMMAND_LOG_ROWS = """
INSERT INTO command_log (command_id, command_type, aggregate_type, aggregate_id, correlation_id,
                         received_at, completed_at, outcome, status_code, error_message,
                         event_ids, summary, principal, idempotency_key, replay_of)
SELECT c.command_id, c.command_type, c.aggregate_type, c.aggregate_id, c.correlation_id, c.received_at,
       c.completed_at, c.outcome, c.status_code, c.error_message,
       string_to_array(c.event_ids, ',')::uuid[], c.summary::jsonb, c.principal, c.idempotency_key, c.replay_of
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], $7::timestamptz[],
            $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[], $15::uuid[])
     AS c (command_id, command_type, aggregate_type, aggregate_id, correlation_id, received_at, completed_at,
           outcome, status_code, error_message, event_ids, summary, principal, idempotency_key, replay_of)
"""

_SELECT_STORED_REPLY = """
SELECT fingerprint, command_id, aggregate_id, aggregate_version, reply, created_at, expires_at
FROM idempotency_keys
WHERE principal = $1 AND command_type = $2 AND idempotency_key = $3
"""

# The key's session lock and its stored reply in one round trip. The look-up's snapshot may
# predate the lock, so it can miss a reply that committed just before; the primary key
# then stops the second write (see put()) and the retry finds the reply (decision 0027).
_LOCK_AND_SELECT_STORED_REPLY = """
SELECT pg_try_advisory_lock($4) AS locked, k.fingerprint, k.command_id, k.aggregate_id, k.aggregate_version,
       k.reply, k.created_at, k.expires_at
FROM (VALUES (1)) AS one (n)
LEFT JOIN idempotency_keys AS k ON k.principal = $1 AND k.command_type = $2 AND k.idempotency_key = $3
"""

# The same for several keys at once (the keyed commands of one batch, decision 0033), in
# the order given. The keys are distinct and each matches at most one row (the primary
# key), so each lock is tried once.
_LOCK_AND_SELECT_STORED_REPLIES = """
SELECT pg_try_advisory_lock(s.lock_id) AS locked, k.fingerprint, k.command_id, k.aggregate_id, k.aggregate_version,
       k.reply, k.created_at, k.expires_at
FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) WITH ORDINALITY
     AS s (principal, command_type, idempotency_key, lock_id, n)
LEFT JOIN idempotency_keys AS k
       ON k.principal = s.principal AND k.command_type = s.command_type AND k.idempotency_key = s.idempotency_key
ORDER BY s.n
"""

_STORED_REPLY_INSERT = """
INSERT INTO idempotency_keys (principal, command_type, idempotency_key, lock_id, fingerprint, command_id,
                              aggregate_id, aggregate_version, reply, created_at, expires_at)
"""
# Replaces only a row that has expired (and not been purged yet); a live row updates
# nothing, which put() reports as a conflict.
_STORED_REPLY_CONFLICT = """
ON CONFLICT (principal, command_type, idempotency_key) DO UPDATE
SET lock_id = EXCLUDED.lock_id, fingerprint = EXCLUDED.fingerprint, command_id = EXCLUDED.command_id,
    aggregate_id = EXCLUDED.aggregate_id, aggregate_version = EXCLUDED.aggregate_version,
    reply = EXCLUDED.reply, created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at
WHERE idempotency_keys.expires_at <= EXCLUDED.created_at
RETURNING 1
"""
_UPSERT_STORED_REPLY = (
    _STORED_REPLY_INSERT + "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)" + _STORED_REPLY_CONFLICT
)

# The stored replies of several commands written together (decision 0033): the same upsert
# over arrays, so its text is the same for any number of them; it must return one row each.
_UNNEST_STORED_REPLIES = """SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bytea[],
    $6::uuid[], $7::text[], $8::bigint[], $9::bytea[], $10::timestamptz[], $11::timestamptz[])"""
_UPSERT_STORED_REPLIES = _STORED_REPLY_INSERT + _UNNEST_STORED_REPLIES + _STORED_REPLY_CONFLICT

# The CTE picks expired rows (skipping rows another purger is deleting); the lock test
# runs only on those, and a row whose key a running command holds is left for next time.
_PURGE_EXPIRED = """
WITH expired AS (
    SELECT principal, command_type, idempotency_key, lock_id
    FROM idempotency_keys
    WHERE expires_at <= $1
    ORDER BY expires_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), unlocked AS (
    SELECT principal, command_type, idempotency_key
    FROM expired
    WHERE pg_try_advisory_xact_lock(lock_id)
)
DELETE FROM idempotency_keys AS k
USING unlocked AS u
WHERE k.principal = u.principal AND k.command_type = u.command_type AND k.idempotency_key = u.idempotency_key
"""


def translate_error(exc: BaseException) -> BaseException:
    """The project's error for a driver exception; anything else is returned unchanged."""
    if isinstance(exc, TimeoutError):
        return errors.Unavailable("the database did not answer within the command's time limit")
    return to_domain_error(exc) or exc


class PostgresIdempotencyStore(IdempotencyStore):
    """Stored replies in `idempotency_keys`, serialized per key by a session-level advisory lock.

    The lock is held from the look-up until the command's write (which releases it in the
    same statement) or until the unit of work ends; a connection whose lock could not be
    released is closed, never handed back to the pool holding it.
    """

    def __init__(self, calls: Calls) -> None:
        self._calls = calls
        # Replies of the pending write (the step list they belong to, and their step's
        # place in it): the replies of commands written together share one upsert.
        self._rows: tuple[list[Any], ...] = ()
        self._at: tuple[list[Step], int] | None = None

    async def try_lock(self, scope: IdempotencyScope) -> bool:
        """pg_try_advisory_lock on the scope's lock id: never waits, held until the unit of work ends."""
        if scope.lock_id in self._calls.key_locks:
            return True
        acquired = bool(await self._calls.fetchval("SELECT pg_try_advisory_lock($1)", scope.lock_id))
        if acquired:
            self._calls.key_locks.append(scope.lock_id)
        return acquired

    async def get(self, scope: IdempotencyScope) -> StoredReply | None:
        """The stored row for the scope, or None."""
        row = await self._calls.fetchrow(_SELECT_STORED_REPLY, scope.principal, scope.command_type, scope.key)
        return _stored_reply(scope, row) if row is not None else None

    async def lock_and_get(self, scope: IdempotencyScope) -> tuple[bool, StoredReply | None]:
        """The lock and the look-up in one round trip."""
        if scope.lock_id in self._calls.key_locks:
            return True, await self.get(scope)
        row = await self._calls.fetchrow(
            _LOCK_AND_SELECT_STORED_REPLY, scope.principal, scope.command_type, scope.key, scope.lock_id
        )
        if row is None or not row["locked"]:
            return False, None
        self._calls.key_locks.append(scope.lock_id)
        return True, (_stored_reply(scope, row) if row["command_id"] is not None else None)

    async def lock_and_get_many(self, scopes: Sequence[IdempotencyScope]) -> list[tuple[bool, StoredReply | None]]:
        """The locks and look-ups of several distinct scopes in one round trip, in order."""
        if len(scopes) == 1 or any(scope.lock_id in self._calls.key_locks for scope in scopes):
            return [await self.lock_and_get(scope) for scope in scopes]
        rows = await self._calls.fetch(
            _LOCK_AND_SELECT_STORED_REPLIES,
            [scope.principal for scope in scopes],
            [scope.command_type for scope in scopes],
            [scope.key for scope in scopes],
            [scope.lock_id for scope in scopes],
        )
        found: list[tuple[bool, StoredReply | None]] = []
        for scope, row in zip(scopes, rows, strict=True):
            if not row["locked"]:
                found.append((False, None))
                continue
            self._calls.key_locks.append(scope.lock_id)
            found.append((True, _stored_reply(scope, row) if row["command_id"] is not None else None))
        return found

    async def put(self, reply: StoredReply) -> None:
        """Insert, or replace an expired row, at commit; a live row (a twin that slipped past the lock) fails it."""
        row = (
            reply.scope.principal,
            reply.scope.command_type,
            reply.scope.key,
            reply.scope.lock_id,
            reply.fingerprint,
            reply.command_id,
            reply.aggregate_id,
            reply.aggregate_version,
            reply.reply,
            reply.created_at,
            reply.expires_at,
        )
        conflict = "another request with this idempotency key committed first; retry the request"
        steps = self._calls.steps
        if self._at is None or self._at[0] is not steps:
            self._at = (steps, len(steps))
            self._rows = tuple([value] for value in row)
            self._calls.write(Step(_UPSERT_STORED_REPLY, row, expect_rows=1, conflict=conflict))
            return
        for column, value in zip(self._rows, row, strict=True):
            column.append(value)
        _, index = self._at
        steps[index] = Step(_UPSERT_STORED_REPLIES, self._rows, expect_rows=len(self._rows[0]), conflict=conflict)


def _stored_reply(scope: IdempotencyScope, row: asyncpg.Record) -> StoredReply:
    return StoredReply(
        scope=scope,
        fingerprint=bytes(row["fingerprint"]),
        command_id=row["command_id"],
        aggregate_id=row["aggregate_id"],
        aggregate_version=row["aggregate_version"],
        reply=bytes(row["reply"]),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
    )


class PostgresExpiredKeyPurger(ExpiredKeyPurger):
    """Deletes expired `idempotency_keys` rows in short transactions of their own."""

    def __init__(self, pool: asyncpg.Pool[Any], *, timeout_s: float = 30.0) -> None:
        self._pool = pool
        self._timeout_s = timeout_s

    async def purge(self, now: datetime, limit: int) -> int:
        """Delete up to `limit` expired rows whose key no running command holds; return how many."""
        async with asyncio.timeout(self._timeout_s):
            async with self._pool.acquire() as conn, conn.transaction():
                status: str = await conn.execute(_PURGE_EXPIRED, now, limit)
        return int(status.rsplit(" ", 1)[1])


class PostgresUnitOfWork(UnitOfWork):
    """Reads on a pooled connection, then one write statement at commit, bounded by the command's deadline."""

    def __init__(self, pool: asyncpg.Pool[Any], deadline: Deadline) -> None:
        self._pool = pool
        self._deadline = deadline
        self._conn: Connection | None = None
        self._calls: Calls | None = None
        self._committed = False
        self._lock_reads = False
        # The pending write's outbox step and command-log rows, and the pending step list
        # they belong to (a write that was sent starts a new list): later rows of the same
        # write join them instead of adding steps.
        self._outbox_step: Step | None = None
        self._outbox_in: list[Step] | None = None
        self._log_rows: tuple[list[Any], ...] = ()
        self._log_at: tuple[list[Step], int] | None = None

    async def __aenter__(self) -> Self:
        """Take a connection; nothing is sent until the first read or the commit."""
        remaining = self._deadline.remaining()
        if remaining <= 0:
            raise errors.Unavailable("the command ran out of time before it reached the database")
        try:
            conn: Connection = await self._pool.acquire(timeout=remaining)
        except TimeoutError:
            raise errors.Unavailable("no database connection became free within the time limit") from None
        except Exception as exc:
            raise translate_error(exc) from exc
        self._conn = conn
        self._calls = Calls(conn, self._deadline)
        self._calls.lock_reads = self._lock_reads
        self._committed = False
        self.users = PostgresUserRepository(self._calls)
        self.products = PostgresProductRepository(self._calls)
        self.orders = PostgresOrderRepository(self._calls)
        self.sagas = PostgresSagaHandoff(self._calls)
        self.idempotency = PostgresIdempotencyStore(self._calls)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Drop the pending write unless committed, release the connection, translate driver errors."""
        await self._finish()
        if exc is not None:
            translated = translate_error(exc)
            if translated is not exc:
                raise translated from exc

    def lock_reads(self) -> None:
        """Reads from now on open an explicit transaction and lock their rows (FOR UPDATE / FOR SHARE)."""
        self._lock_reads = True
        if self._calls is not None:
            self._calls.lock_reads = True

    async def append_events(self, events: Sequence[NewEvent], *, correlation_id: str, causation_id: str) -> None:
        """Add the events to the outbox at commit, as rows of the write's one outbox insert.

        One insert for every event of the write keeps their ids (the relay's order) in the
        order they were appended: separate inserts in one statement run in no set order.
        """
        if not events:
            return
        calls = self._active()
        step = self._outbox_step
        if step is not None and self._outbox_in is calls.steps:
            add_outbox_rows(step.args, events, correlation_id=correlation_id, causation_id=causation_id)  # type: ignore[arg-type]
            return
        sql, args = outbox_insert(events, correlation_id=correlation_id, causation_id=causation_id)
        self._outbox_step, self._outbox_in = Step(sql, args), calls.steps
        calls.write(self._outbox_step)

    async def log_command(self, entry: CommandLogEntry) -> None:
        """Add the command-log row at commit; the rows of commands written together share one insert."""
        calls = self._active()
        row = (
            entry.command_id,
            entry.command_type,
            entry.aggregate_type,
            entry.aggregate_id,
            entry.correlation_id,
            entry.received_at,
            entry.completed_at,
            entry.outcome,
            entry.status_code,
            entry.error_message,
            list(entry.event_ids),
            json.dumps(dict(entry.summary), sort_keys=True),
            entry.principal,
            entry.idempotency_key,
            entry.replay_of,
        )
        if self._log_at is None or self._log_at[0] is not calls.steps:
            self._log_at = (calls.steps, len(calls.steps))
            self._log_rows = tuple([value] for value in row)
            calls.write(Step(_INSERT_COMMAND_LOG, row))
            return
        for column, value in zip(self._log_rows, row, strict=True):
            column.append(value)
        steps, index = self._log_at
        event_ids = self._log_rows[10]
        args = (*self._log_rows[:10], [",".join(map(str, ids)) for ids in event_ids], *self._log_rows[11:])
        steps[index] = Step(_INSERT_COMMAND_LOG_ROWS, args)

    async def commit(self) -> None:
        """Write everything in one statement (one implicit transaction), or finish the explicit one."""
        await self._active().commit()
        self._committed = True

    def _active(self) -> Calls:
        if self._calls is None:
            raise RuntimeError("the unit of work is used outside `async with`")
        return self._calls

    async def _finish(self) -> None:
        """Roll back an open transaction, release held key locks, and hand the connection back."""
        conn, calls = self._conn, self._calls
        self._conn = self._calls = None
        if conn is None or calls is None:
            return
        try:
            if not self._committed and conn.is_in_transaction():
                await self._rollback(conn)
            if calls.key_locks and not conn.is_closed():
                await self._unlock(conn, calls.key_locks)
        finally:
            await self._release(conn)

    async def _release(self, conn: Connection) -> None:
        """Hand the connection back; a failure to reset it never changes the command's outcome.

        The pool resets a connection on release and, when that fails (the server ended the
        session just then; asyncpg may report it as InternalClientError), terminates it and
        re-raises. By then the transaction has committed or rolled back, so the caller must
        still get the command's own result, not an error about a connection it no longer uses.
        """
        try:
            # An explicit budget: by default asyncpg allows the release the acquire's timeout, the
            # command's remaining time, which a command cut off by its deadline has spent. The
            # release then terminates the connection at once, and termination drops asyncpg's
            # pending cancel request: a statement the cancelled call left running (a lock wait,
            # say) went on without a client until statement_timeout. With the grace, the release
            # waits for that cancel to end the statement, then rolls back what is still open.
            await self._pool.release(conn, timeout=_ROLLBACK_GRACE_S)
        except Exception as exc:
            logger.warning("discarded a connection that failed to reset on release (%s)", type(exc).__name__)

    async def _rollback(self, conn: Connection) -> None:
        try:
            async with asyncio.timeout(max(self._deadline.remaining(), _ROLLBACK_GRACE_S)):
                await conn.execute("ROLLBACK")
        except (Exception, asyncio.CancelledError) as exc:
            # The connection's state is unknown: drop it rather than hand a dirty one to the next command.
            logger.debug("rollback failed (%s); closing the connection", type(exc).__name__)
            conn.terminate()
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def _unlock(self, conn: Connection, lock_ids: Sequence[int]) -> None:
        """Release key locks the write did not release; a connection that cannot is closed, locks and all."""
        try:
            async with asyncio.timeout(max(self._deadline.remaining(), _ROLLBACK_GRACE_S)):
                # A lock the failed write already released answers false, with a server warning.
                await conn.execute("SELECT pg_advisory_unlock(k) FROM unnest($1::bigint[]) AS k", list(lock_ids))
        except (Exception, asyncio.CancelledError) as exc:
            logger.debug("releasing key locks failed (%s); closing the connection", type(exc).__name__)
            conn.terminate()
            if isinstance(exc, asyncio.CancelledError):
                raise
