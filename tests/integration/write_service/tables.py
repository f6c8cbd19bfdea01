"""Reading the write side's tables back in tests."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

_ORDER = {"users": "created_at", "outbox": "id", "command_log": "received_at"}


async def rows(pool: asyncpg.Pool[Any], name: str) -> list[dict[str, Any]]:
    """Every row of `users`, `outbox` or `command_log` as dicts, the summary jsonb decoded."""
    records = await pool.fetch(f"SELECT * FROM {name} ORDER BY {_ORDER[name]}")
    result = [dict(r) for r in records]
    for row in result:
        if "summary" in row:
            row["summary"] = json.loads(row["summary"])
    return result


async def everything_as_text(pool: asyncpg.Pool[Any]) -> str:
    """The three tables rendered as text (payload bytes decoded loosely), for leak checks."""
    parts: list[str] = []
    for name in _ORDER:
        for row in await pool.fetch(f"SELECT t::text AS line FROM {name} AS t"):
            parts.append(row["line"])
    for row in await pool.fetch("SELECT payload FROM outbox"):
        parts.append(bytes(row["payload"]).decode("utf-8", errors="replace"))
    return "\n".join(parts)
