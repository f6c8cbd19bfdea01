"""`python -m write_service.saga.admin`: list, show and retry order sagas in DATABASE_URL.

    python -m write_service.saga.admin list [--status failed] [--limit 50] [--json]
    python -m write_service.saga.admin show SAGA_OR_ORDER_ID [--json]
    python -m write_service.saga.admin retry SAGA_OR_ORDER_ID

Exit codes: 0 done, 1 the database failed, 2 bad arguments, 3 not found, 4 not retryable.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import asyncpg

from shared_kernel.contracts import errors
from shared_kernel.platform.db import NOT_UP_YET
from shared_kernel.platform.runtime import run
from write_service.saga.operations import (
    MAX_PAGE_SIZE,
    STATUSES,
    SagaRecord,
    get_saga,
    list_sagas,
    parse_id,
    retry_saga,
)
from write_service.saga.settings import SagaAdminSettings

_FAILURES: tuple[type[BaseException], ...] = (*NOT_UP_YET, asyncpg.PostgresError, asyncpg.InterfaceError)


def parser() -> argparse.ArgumentParser:
    """The command line."""
    root = argparse.ArgumentParser(prog="python -m write_service.saga.admin", description=__doc__.split("\n")[0])
    commands = root.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="sagas, newest first")
    listing.add_argument("--status", choices=STATUSES)
    listing.add_argument("--limit", type=int, default=50, help="how many (1 to 10000)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    show = commands.add_parser("show", help="one saga with its step log")
    show.add_argument("id", help="saga id or order id")
    show.add_argument("--json", action="store_true")
    retry = commands.add_parser("retry", help="put a failed saga back to work")
    retry.add_argument("id", help="saga id or order id")
    return root


def _line(record: SagaRecord) -> str:
    return (
        f"{record.id}  order {record.order_id}  {record.status:<12} {record.current_step:<20} "
        f"attempts {record.attempts}  updated {record.updated_at.isoformat()}"
        + (f"  error: {record.last_error}" if record.last_error else "")
    )


def _show(record: SagaRecord, out: TextIO) -> None:
    out.write(_line(record) + "\n")
    for step in record.steps:
        out.write(
            f"  {step.at.isoformat()}  {step.kind:<10} {step.step:<20} {step.outcome:<9} "
            f"attempt {step.attempt}  {step.detail}\n"
        )


async def execute(args: argparse.Namespace, pool: asyncpg.Pool[Any], out: TextIO) -> int:
    """Run one parsed command against `pool`."""
    if args.command == "list":
        remaining = max(1, min(args.limit, 10_000))
        token = ""
        while remaining > 0:
            page = await list_sagas(pool, args.status, min(remaining, MAX_PAGE_SIZE), token)
            for record in page.sagas:
                out.write((json.dumps(record.as_json()) if args.json else _line(record)) + "\n")
            remaining -= len(page.sagas)
            token = page.next_page_token
            if not token:
                break
        return 0
    saga_id = parse_id(args.id)
    if args.command == "show":
        record = await get_saga(pool, saga_id)
        if args.json:
            out.write(json.dumps(record.as_json()) + "\n")
        else:
            _show(record, out)
        return 0
    record = await retry_saga(pool, saga_id, f"cli:{getpass.getuser()}")
    out.write(f"retried: {_line(record)}\n")
    return 0


async def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Parse, connect, run; errors become a message and an exit code."""
    args = parser().parse_args(argv)
    settings = SagaAdminSettings()
    try:
        pool: asyncpg.Pool[Any] = await asyncpg.create_pool(
            str(settings.database_url), min_size=1, max_size=2, timeout=settings.database_connect_timeout_s
        )
    except _FAILURES as exc:
        err.write(f"cannot reach the database: {type(exc).__name__}: {exc}\n")
        return 1
    try:
        return await execute(args, pool, out)
    except errors.InvalidArgument as exc:
        err.write(f"{exc.message}: {'; '.join(f'{v.field} {v.description}' for v in exc.violations)}\n")
        return 2
    except errors.NotFound as exc:
        err.write(f"{exc.message}\n")
        return 3
    except errors.FailedPrecondition as exc:
        err.write(f"{exc.message}\n")
        return 4
    except _FAILURES as exc:
        err.write(f"database error: {type(exc).__name__}: {exc}\n")
        return 1
    finally:
        await pool.close()


if __name__ == "__main__":
    sys.exit(run(main()))
