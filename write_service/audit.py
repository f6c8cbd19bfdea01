"""`python -m write_service.audit`: who sent which command, when, and how it ended.

Reads the command log of DATABASE_URL, newest first. Every filter is a bound parameter
of a fixed query; nothing the caller types becomes SQL. Times are ISO-8601; one without
an offset is taken as UTC. Output is an aligned table, or one JSON object per line with
--json.

    python -m write_service.audit --since 2025-06-01T00:00Z --principal billing --outcome rejected
    python -m write_service.audit --aggregate-id 0f6c… --json
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO, get_args

import asyncpg

from shared_kernel.platform.db import NOT_UP_YET
from shared_kernel.platform.runtime import run
from write_service.service_layer.ports import Outcome
from write_service.settings import AuditSettings

DEFAULT_LIMIT = 50
MAX_LIMIT = 10_000
OUTCOMES: tuple[str, ...] = get_args(Outcome)

_FAILURES: tuple[type[BaseException], ...] = (*NOT_UP_YET, asyncpg.PostgresError, asyncpg.InterfaceError)

_COLUMNS = (
    "command_id, received_at, completed_at, principal, command_type, idempotency_key, outcome, status_code, "
    "error_message, aggregate_type, aggregate_id, correlation_id, event_ids, replay_of, summary::text AS summary"
)


@dataclass(frozen=True, slots=True)
class AuditFilters:
    """What to select from the command log; None means "any"."""

    since: datetime | None = None
    until: datetime | None = None
    command_type: str | None = None
    principal: str | None = None
    outcome: str | None = None
    aggregate_id: str | None = None
    idempotency_key: str | None = None
    limit: int = DEFAULT_LIMIT


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One command-log row as the CLI shows it."""

    command_id: uuid.UUID
    received_at: datetime
    completed_at: datetime
    principal: str
    command_type: str
    idempotency_key: str
    outcome: str
    status_code: str
    error_message: str
    aggregate_type: str
    aggregate_id: str
    correlation_id: str
    event_ids: tuple[uuid.UUID, ...]
    replay_of: uuid.UUID | None
    summary: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        """The record as JSON-ready values (ids as strings, times in ISO-8601 UTC)."""
        return {
            "command_id": str(self.command_id),
            "received_at": self.received_at.astimezone(UTC).isoformat(),
            "completed_at": self.completed_at.astimezone(UTC).isoformat(),
            "principal": self.principal,
            "command_type": self.command_type,
            "idempotency_key": self.idempotency_key,
            "outcome": self.outcome,
            "status_code": self.status_code,
            "error_message": self.error_message,
            "aggregate_type": self.aggregate_type,
            "aggregate_id": self.aggregate_id,
            "correlation_id": self.correlation_id,
            "event_ids": [str(e) for e in self.event_ids],
            "replay_of": str(self.replay_of) if self.replay_of is not None else None,
            "summary": self.summary,
        }


def build_query(filters: AuditFilters) -> tuple[str, list[object]]:
    """The SELECT for `filters` and its parameters; only fixed clauses, values always bound."""
    clauses: list[str] = []
    params: list[object] = []

    def where(clause: str, value: object) -> None:
        params.append(value)
        clauses.append(clause.format(f"${len(params)}"))

    for clause, value in (
        ("received_at >= {}", filters.since),
        ("received_at < {}", filters.until),
        ("command_type = {}", filters.command_type),
        ("principal = {}", filters.principal),
        ("outcome = {}", filters.outcome),
        ("aggregate_id = {}", filters.aggregate_id),
        ("idempotency_key = {}", filters.idempotency_key),
    ):
        if value is not None:
            where(clause, value)
    params.append(filters.limit)
    where_sql = f"WHERE {' AND '.join(clauses)} " if clauses else ""
    sql = (
        f"SELECT {_COLUMNS} FROM command_log {where_sql}"  # noqa: S608 - fixed clauses, bound values
        f"ORDER BY received_at DESC, command_id DESC LIMIT ${len(params)}"
    )
    return sql, params


async def query(conn: asyncpg.Connection[Any], filters: AuditFilters) -> list[AuditRecord]:
    """The command-log rows that match `filters`, newest first."""
    sql, params = build_query(filters)
    rows = await conn.fetch(sql, *params)
    return [
        AuditRecord(
            command_id=row["command_id"],
            received_at=row["received_at"],
            completed_at=row["completed_at"],
            principal=row["principal"],
            command_type=row["command_type"],
            idempotency_key=row["idempotency_key"],
            outcome=row["outcome"],
            status_code=row["status_code"],
            error_message=row["error_message"],
            aggregate_type=row["aggregate_type"],
            aggregate_id=row["aggregate_id"],
            correlation_id=row["correlation_id"],
            event_ids=tuple(row["event_ids"]),
            replay_of=row["replay_of"],
            summary=json.loads(row["summary"]),
        )
        for row in rows
    ]


_TABLE_HEADERS = (
    "RECEIVED_AT",
    "PRINCIPAL",
    "COMMAND",
    "OUTCOME",
    "STATUS",
    "AGGREGATE_ID",
    "IDEMPOTENCY_KEY",
    "EVENT_IDS",
    "DETAIL",
)


def _printable(value: str) -> str:
    """`value` with anything that could move a terminal's cursor escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in value) or "-"


def _table_row(record: AuditRecord) -> tuple[str, ...]:
    detail = json.dumps(record.summary, sort_keys=True, ensure_ascii=False)
    if record.replay_of is not None:
        detail = f"replay of {record.replay_of} {detail}"
    if record.error_message:
        detail = f"{record.error_message} {detail}"
    return tuple(
        _printable(v)
        for v in (
            record.received_at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            record.principal,
            record.command_type,
            record.outcome,
            record.status_code,
            record.aggregate_id,
            record.idempotency_key,
            ",".join(str(e) for e in record.event_ids),
            detail,
        )
    )


def write_table(records: Sequence[AuditRecord], out: TextIO) -> None:
    """Aligned columns, a header first; the last column (summary, error) is not padded."""
    rows = [_TABLE_HEADERS, *(_table_row(r) for r in records)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_TABLE_HEADERS) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        out.write("  ".join([*cells, row[-1]]) + "\n")


def write_json_lines(records: Sequence[AuditRecord], out: TextIO) -> None:
    """One JSON object per record and line."""
    for record in records:
        out.write(json.dumps(record.as_json(), sort_keys=True, ensure_ascii=False) + "\n")


def _timestamp(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {value!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _limit(value: str) -> int:
    try:
        limit = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_LIMIT}")
    return limit


def parser() -> argparse.ArgumentParser:
    """The command line: filters, a bounded limit, and the output format."""
    cli = argparse.ArgumentParser(
        prog="python -m write_service.audit",
        description="Query the command log (the write side's audit trail) of DATABASE_URL, newest first.",
    )
    cli.add_argument(
        "--since", type=_timestamp, metavar="TIME", help="received at or after this ISO-8601 time (UTC if no offset)"
    )
    cli.add_argument(
        "--until", type=_timestamp, metavar="TIME", help="received before this ISO-8601 time (UTC if no offset)"
    )
    cli.add_argument("--command-type", help="e.g. RegisterUser, UpdateUserProfile, DeactivateUser")
    cli.add_argument("--principal", help="the caller, as authenticated (token subject)")
    cli.add_argument("--outcome", choices=OUTCOMES)
    cli.add_argument("--aggregate-id", help="the user (or other aggregate) id")
    cli.add_argument("--idempotency-key", help="the idempotency-key header the command carried")
    cli.add_argument(
        "--limit",
        type=_limit,
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"most rows to print (default {DEFAULT_LIMIT}, max {MAX_LIMIT})",
    )
    cli.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    return cli


def filters_from(args: argparse.Namespace) -> AuditFilters:
    """The filters the parsed command line asks for."""
    return AuditFilters(
        since=args.since,
        until=args.until,
        command_type=args.command_type,
        principal=args.principal,
        outcome=args.outcome,
        aggregate_id=args.aggregate_id,
        idempotency_key=args.idempotency_key,
        limit=args.limit,
    )


async def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    """Print the matching rows; 0 on success, 1 when the database cannot be queried, 2 for bad usage."""
    cli = parser()
    args = cli.parse_args(argv)
    filters = filters_from(args)
    if filters.since is not None and filters.until is not None and filters.since >= filters.until:
        cli.error("--since must be earlier than --until")
    settings = AuditSettings()
    try:
        conn: asyncpg.Connection[Any] = await asyncpg.connect(
            str(settings.database_url),
            timeout=settings.database_connect_timeout_s,
            command_timeout=settings.database_statement_timeout_ms / 1000 or None,
            server_settings={"application_name": "tessera-audit"},
        )
        try:
            records = await query(conn, filters)
        finally:
            await conn.close()
    except _FAILURES as exc:
        print(f"audit query failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        write_json_lines(records, out)
    else:
        write_table(records, out)
    return 0


if __name__ == "__main__":
    sys.exit(run(main()))
