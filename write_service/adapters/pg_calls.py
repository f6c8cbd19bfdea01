"""A unit of work's connection, deadline and pending write, shared by every Postgres repository of the write side.

Reads run at once, each as one statement in its own implicit transaction. Writes are
kept as `Step`s and sent at commit as ONE statement (a data-modifying CTE), which
Postgres runs in one implicit transaction: a command that reads, then writes, costs two
round trips (decision 0027). A step may be a guard: it must return exactly the rows it
expects (the version it read is still stored, a stored reply was really inserted), or
the whole statement fails and nothing of it is written.

Code that reads after it has written (a rare path: tests, tools) still gets
read-your-writes: the first such read opens an explicit transaction, sends the pending
statement in it, and the unit of work finishes that transaction at commit.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg

from shared_kernel.contracts import errors

if TYPE_CHECKING:
    # Generic only in the stubs; at run time the class cannot be subscripted.
    from asyncpg.pool import PoolConnectionProxy

    from write_service.service_layer.deadline import Deadline

    Connection = PoolConnectionProxy[Any]

_CLIENT_GRACE_S = 0.1

_PLACEHOLDER = re.compile(r"\$(\d+)")

# A guard that did not hold casts its marker to boolean, which fails with the marker in the
# message: plain SQL can raise no error of its own, and this needs no server-side function.
# The cast applies to the CASE's result, never to a constant, so planning cannot fold it.
_GUARD_MARKER = "write-guard:"
_GUARD_FAILED = re.compile(r'"write-guard:(\d+)"')


@dataclass(frozen=True, slots=True)
class Step:
    """One statement of a unit of work's write, with `$1..$n` numbered for itself alone."""

    sql: str
    args: tuple[object, ...] = ()
    # A guard: the statement returns rows (RETURNING, or a SELECT ... FOR SHARE) and must return exactly this many.
    expect_rows: int | None = None
    # What a guard that failed means: a Conflict with this message (the bus retries), or a bug.
    conflict: str = ""
    bug: bool = False
    # A unique index this step may violate, and the error that violation means.
    unique: Mapping[str, Callable[[], errors.DomainError]] = field(default_factory=dict)
    # The CTE's name, for a later step that reads its RETURNING rows; unique within the write.
    name: str = ""
    # False for a guard that only re-checks what a read saw: a later read need not send it first.
    writes: bool = True


def compose(steps: Sequence[Step], unlock: Sequence[int] = ()) -> tuple[str, list[object]]:
    """One statement that runs every step (and then releases the session locks `unlock`); its arguments."""
    shape = tuple((step.sql, len(step.args), step.expect_rows, step.name, step.writes) for step in steps)
    args: list[object] = []
    for index, step in enumerate(steps):
        args.extend(step.args)
        if step.expect_rows is not None:
            args.append(f"{_GUARD_MARKER}{index}")
    if unlock:
        args.append(list(unlock))
    return _statement(shape, bool(unlock)), args


@functools.lru_cache(maxsize=256)
def _statement(shape: tuple[tuple[str, int, int | None, str, bool], ...], unlock: bool) -> str:
    """The text of a composed statement: the same for every write of the same steps, so built once.

    Postgres runs the guarded steps in the order of their checks, and the others after them.
    Checks of writing steps come first, in step order, and re-checks of reads last: an
    order's row is then locked before the products its command read, as the saga's steps
    lock them, so the two cannot deadlock.
    """
    ctes: list[str] = []
    checks: list[str] = []
    read_checks: list[str] = []
    count = 0
    for index, (sql, arg_count, expect_rows, step_name, writes) in enumerate(shape):
        offset = count
        body = _PLACEHOLDER.sub(lambda m, offset=offset: f"${int(m.group(1)) + offset}", sql.strip())  # type: ignore[misc]
        count += arg_count
        name = step_name or f"step_{index}"
        ctes.append(f"{name} AS (\n{body}\n)")
        if expect_rows is not None:
            count += 1
            # Only our own CTE names and integers are formatted in; every value is a parameter.
            (checks if writes else read_checks).append(
                f"(CASE WHEN (SELECT count(*) FROM {name}) = {int(expect_rows)} THEN 'true' "  # noqa: S608
                f"ELSE ${count}::text END)::boolean"
            )
    selected = " AND ".join(checks + read_checks) or "true"
    if unlock:
        count += 1
        selected += f", (SELECT bool_and(pg_advisory_unlock(k)) FROM unnest(${count}::bigint[]) AS k)"  # noqa: S608
    head = f"WITH {', '.join(ctes)}\n" if ctes else ""
    return f"{head}SELECT {selected}"


def write_error(exc: asyncpg.PostgresError, steps: Sequence[Step]) -> BaseException | None:
    """The project's error for a failure of a composed write, or None to let the driver's error through."""
    if isinstance(exc, asyncpg.InvalidTextRepresentationError):
        found = _GUARD_FAILED.search(str(exc))
        if found is not None and int(found.group(1)) < len(steps):
            step = steps[int(found.group(1))]
            if step.bug:
                return RuntimeError(step.conflict)
            return errors.Conflict(step.conflict)
    if isinstance(exc, asyncpg.UniqueViolationError):
        constraint = exc.constraint_name or ""
        for step in steps:
            if constraint in step.unique:
                return step.unique[constraint]()
    return None


class Calls:
    """Runs one unit of work's calls within the command's deadline and keeps its pending write."""

    def __init__(self, conn: Connection, deadline: Deadline) -> None:
        self.conn = conn
        self.deadline = deadline
        self.steps: list[Step] = []
        # Explicit BEGIN sent (a read came after a write): commit must send COMMIT.
        self.in_transaction = False
        # Session advisory locks of idempotency keys this unit of work holds.
        self.key_locks: list[int] = []
        # (kind, id) of the aggregates read here: saving another one is checked at once.
        self.loaded: set[tuple[str, object]] = set()
        # Whether anything was read: a new aggregate added before any read (no uniqueness
        # pre-check ran) is checked at once too.
        self.has_read = False
        # A retry after a lost guard: reads run in an explicit transaction and lock their rows.
        self.lock_reads = False

    def timeout(self) -> float:
        """The time a call may take: what is left of the deadline, and a short grace.

        Every statement is sent with it as the driver's own `timeout`: asyncpg then raises
        TimeoutError and cancels the statement on the server, so a lock wait ends with the
        caller's deadline. Its timer costs less than an `asyncio.timeout` block per call. The
        grace lets a server-side statement_timeout (set in explicit transactions) fire first:
        a clean error that leaves the connection usable.
        """
        return self.deadline.remaining() + _CLIENT_GRACE_S

    async def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        """Rows of one read (after any pending write, which it then sees)."""
        await self._before_read()
        return await self.conn.fetch(sql, *args, timeout=self.timeout())

    async def fetchrow(self, sql: str, *args: object) -> asyncpg.Record | None:
        """The first row of one read, or None."""
        await self._before_read()
        return await self.conn.fetchrow(sql, *args, timeout=self.timeout())

    async def fetchval(self, sql: str, *args: object) -> Any:
        """The first value of one read."""
        await self._before_read()
        return await self.conn.fetchval(sql, *args, timeout=self.timeout())

    def write(self, step: Step) -> None:
        """Add a step to the pending write; nothing is sent until the unit of work commits."""
        self.steps.append(step)

    async def check_insert_now(self) -> None:
        """Send the pending write now if no pre-check read ran here: nothing has checked the insert yet."""
        if not self.has_read:
            await self.flush()

    async def check_version_now(self, kind: str, aggregate_id: object) -> None:
        """Send the pending write now if this unit of work did not read the aggregate: nothing vouches for it."""
        if (kind, aggregate_id) not in self.loaded:
            await self.flush()

    def unique_name(self, base: str) -> str:
        """A CTE name no other step of this write uses."""
        return f"{base}_{len(self.steps)}"

    async def flush(self) -> None:
        """Send the pending write now, inside an explicit transaction (opened if needed)."""
        if not self.in_transaction:
            timeout_ms = max(1, int(self.deadline.remaining() * 1000))
            # BEGIN and the statement cap in one round trip; an int, so formatting it is safe.
            await self.conn.execute(f"BEGIN; SET LOCAL statement_timeout = {timeout_ms}", timeout=self.timeout())
            self.in_transaction = True
        await self._send(unlock=())

    async def commit(self) -> None:
        """Send the pending write and release the key locks: one statement, or COMMIT after a flush."""
        if self.in_transaction:
            if self.steps or self.key_locks:
                await self._send(unlock=self.key_locks)
            status = await self.conn.execute("COMMIT", timeout=self.timeout())
            self.in_transaction = False
            if status != "COMMIT":
                # Postgres answers COMMIT of a transaction an earlier error aborted with ROLLBACK.
                raise errors.Unavailable("the transaction was rolled back by the database instead of committed")
        elif self.steps or self.key_locks:
            await self._send(unlock=self.key_locks)
        self.key_locks = []

    async def _before_read(self) -> None:
        self.has_read = True
        if any(step.writes for step in self.steps) or (self.lock_reads and not self.in_transaction):
            await self.flush()

    async def _send(self, *, unlock: Sequence[int]) -> None:
        if not self.steps and not unlock:
            return
        steps, self.steps = self.steps, []
        sql, args = compose(steps, unlock)
        try:
            await self.conn.execute(sql, *args, timeout=self.timeout())
        except asyncpg.PostgresError as exc:
            translated = write_error(exc, steps)
            if translated is not None:
                raise translated from exc
            raise
