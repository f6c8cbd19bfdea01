"""Throwaway databases on a Postgres server: created under a unique name, migrated, dropped.

The tests make one per test (or per module) and the measurements one per run, so that neither
sees another's data.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from shared_kernel.platform import migrations


def with_database(dsn: str, database: str) -> str:
    """`dsn` pointing at `database` instead."""
    return urlunsplit(urlsplit(dsn)._replace(path="/" + database))


async def create_database(admin_url: str, migrate: bool = True, *, prefix: str = "tessera_test_") -> str:
    """Create a uniquely named database (migrated unless told not to) and return its DSN."""
    name = f"{prefix}{secrets.token_hex(6)}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = with_database(admin_url, name)
    if migrate:
        conn = await asyncpg.connect(url)
        try:
            await migrations.apply(conn)
        finally:
            await conn.close()
    return url


async def drop_database(admin_url: str, url: str) -> None:
    """Drop a database made by create_database, disconnecting stragglers first."""
    name = urlsplit(url).path.lstrip("/")
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def throwaway_database(
    admin_url: str, migrate: bool = True, *, prefix: str = "tessera_test_"
) -> AsyncIterator[str]:
    """A new database (migrated unless told not to) for the block, dropped on exit."""
    url = await create_database(admin_url, migrate, prefix=prefix)
    try:
        yield url
    finally:
        await drop_database(admin_url, url)
