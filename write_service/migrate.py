"""`python -m write_service.migrate`: apply pending migrations to DATABASE_URL, then exit.

Waits for Postgres to accept connections (up to MIGRATE_WAIT_S), so it can run as a
one-shot job beside a database that is still starting.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

import asyncpg

from shared_kernel import migrations
from shared_kernel.logs import configure_logging
from shared_kernel.runtime import run
from write_service.settings import MigrateSettings

logger = logging.getLogger("write_service.migrate")

# Errors that mean "not up yet"; a bad password or a missing database fails at once.
_RETRYABLE = (
    OSError,
    TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.PostgresConnectionError,
)


async def connect(settings: MigrateSettings) -> asyncpg.Connection[Any]:
    """Connect to DATABASE_URL, retrying with backoff until MIGRATE_WAIT_S runs out."""
    deadline = time.monotonic() + settings.migrate_wait_s
    delay = 0.1
    while True:
        try:
            conn: asyncpg.Connection[Any] = await asyncpg.connect(
                str(settings.database_url), timeout=settings.database_connect_timeout_s
            )
        except _RETRYABLE as exc:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning("Postgres not reachable yet (%s), retrying", type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        else:
            return conn


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
    except (*_RETRYABLE, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
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
