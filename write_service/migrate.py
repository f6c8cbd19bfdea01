"""`python -m write_service.migrate`: apply pending migrations to DATABASE_URL, then exit.

Waits for Postgres to accept connections (up to MIGRATE_WAIT_S), so it can run as a
one-shot job beside a database that is still starting.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import asyncpg

from shared_kernel.platform import migrations
from shared_kernel.platform.db import NOT_UP_YET, retry_while_starting
from shared_kernel.platform.logs import configure_logging
from shared_kernel.platform.runtime import run
from write_service.settings import MigrateSettings

logger = logging.getLogger("write_service.migrate")

_FAILURES: tuple[type[BaseException], ...] = (*NOT_UP_YET, asyncpg.PostgresError, asyncpg.InterfaceError)


async def connect(settings: MigrateSettings) -> asyncpg.Connection[Any]:
    """Connect to DATABASE_URL, retrying with backoff until MIGRATE_WAIT_S runs out."""

    async def open_connection() -> asyncpg.Connection[Any]:
        conn: asyncpg.Connection[Any] = await asyncpg.connect(
            str(settings.database_url), timeout=settings.database_connect_timeout_s
        )
        return conn

    return await retry_while_starting(open_connection, settings.migrate_wait_s)


async def migrate(settings: MigrateSettings) -> list[migrations.Migration]:
    """Apply every pending migration; return the ones this run applied."""
    conn = await connect(settings)
    try:
        applied = set(await migrations.apply(conn))
    finally:
        await conn.close()
    return [m for m in migrations.discover() if m.version in applied]


async def main() -> int:
    """Run migrate; print what it applied. 0 on success, 1 when the database is out of reach."""
    settings = MigrateSettings()
    configure_logging(settings.log_level, settings.log_format, service="write_service.migrate")
    try:
        applied = await migrate(settings)
    except _FAILURES as exc:
        print(f"migrate failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if applied:
        for migration in applied:
            print(f"applied {migration.version:04d}_{migration.name}")
    else:
        print("no pending migrations")
    return 0


if __name__ == "__main__":
    sys.exit(run(main()))
