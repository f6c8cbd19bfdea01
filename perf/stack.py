"""The measured stack: backing servers, a scratch database and key prefix, a stack on them, RSS, the machine.

Postgres and Redis come from DATABASE_URL / REDIS_URL when set, else from embedded servers.
Each measurement gets a new migrated database (dropped afterwards) and a Redis key prefix of
its own (deleted afterwards), so measurements cannot see each other's data.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import re
import secrets
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from devstack.databases import throwaway_database
from devstack.servers import postgres_admin_url, redis_server_url
from devstack.supervisor import Stack, StackConfig


def scratch_database(admin_url: str) -> contextlib.AbstractAsyncContextManager[str]:
    """A new, migrated database, dropped on exit."""
    return throwaway_database(admin_url, prefix="tessera_bench_")


@contextlib.contextmanager
def backing_servers() -> Iterator[tuple[str, str]]:
    """DATABASE_URL and REDIS_URL, or embedded servers for what is not set."""
    with postgres_admin_url("DATABASE_URL") as database, redis_server_url("REDIS_URL") as redis_url:
        yield database, redis_url


@dataclass(frozen=True, slots=True)
class Backing:
    """Admin DSN of the Postgres server (databases are created on it) and the Redis URL."""

    admin_url: str
    redis_url: str


@dataclass(frozen=True, slots=True)
class Scratch:
    """One bench's database and Redis key prefix."""

    database_url: str
    redis_url: str
    prefix: str


async def clear_prefix(redis_url: str, prefix: str) -> None:
    """Delete every Redis key under `prefix`."""
    client = aioredis.Redis.from_url(redis_url, socket_timeout=30)
    try:
        batch: list[Any] = []
        async for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await client.unlink(*batch)
                batch.clear()
        if batch:
            await client.unlink(*batch)
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def scratch(backing: Backing, name: str) -> AsyncIterator[Scratch]:
    """A migrated database and a key prefix for bench `name`, both removed on exit."""
    prefix = f"bench:{name}:{secrets.token_hex(4)}:"
    async with scratch_database(backing.admin_url) as url:
        try:
            yield Scratch(database_url=url, redis_url=backing.redis_url, prefix=prefix)
        finally:
            await clear_prefix(backing.redis_url, prefix)


def bench_stack(
    place: Scratch,
    *,
    relays: int = 1,
    readers: int = 1,
    env: dict[str, str] | None = None,
    log_dir: Path | None = None,
    saga: bool = False,
    provider_env: dict[str, str] | None = None,
) -> Stack:
    """A stack (not started) on `place`: write service, relays, replicas; with `saga`, a payment
    provider (its environment plus `provider_env`) and one saga worker too."""
    return Stack(
        StackConfig(
            database_url=place.database_url,
            redis_url=place.redis_url,
            redis_key_prefix=place.prefix,
            read_ports=tuple(0 for _ in range(readers)),
            relays=relays,
            payment_provider=saga,
            saga_workers=1 if saga else 0,
            provider_env=provider_env or {},
            migrate=False,
            env={"LOG_LEVEL": "WARNING", **(env or {})},
            log_dir=log_dir,
        )
    )


# Cheap password hashing for the stacks the tools start: their figures count from a command's
# reply or measure reads, so argon2's deliberate cost would only slow the seeding.
FAST_HASHING = {"ARGON2_TIME_COST": "1", "ARGON2_MEMORY_COST_KIB": "1024", "ARGON2_PARALLELISM": "1"}


def tool_stack_config(name: str, *, env: dict[str, str] | None = None, **overrides: Any) -> StackConfig:
    """A stack over DATABASE_URL / REDIS_URL (embedded servers when unset) under a key prefix of its own.

    For the tools that start one stack and run against it; no payment provider or saga worker
    unless `overrides` asks for them, cheap hashing, warnings-only logs.
    """
    settings: dict[str, Any] = {"payment_provider": False, "saga_workers": 0, **overrides}
    return StackConfig(
        database_url=os.environ.get("DATABASE_URL"),
        redis_url=os.environ.get("REDIS_URL"),
        redis_key_prefix=f"{name}:{secrets.token_hex(4)}:",
        env={**FAST_HASHING, "LOG_LEVEL": "WARNING", **(env or {})},
        **settings,
    )


@contextlib.contextmanager
def tool_stack(config: StackConfig) -> Iterator[Stack]:
    """Run the stack of `config`; once it has stopped (on success, failure or Ctrl-C alike),
    delete its key prefix, so that no replica writes a key behind the cleanup."""
    try:
        with Stack(config) as stack:
            yield stack
    finally:
        if config.redis_url:
            asyncio.run(clear_prefix(config.redis_url, config.redis_key_prefix))


def _rss_kib(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmRSS:\s+(\d+)\s+kB", status, re.MULTILINE)
    return int(match.group(1)) if match else 0


def process_group_rss_mb(leader: int) -> float:
    """Resident memory, in MiB, of `leader` and every process in its process group (its workers)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        with contextlib.suppress(OSError):
            if pid == leader or os.getpgid(pid) == leader:
                total += _rss_kib(pid)
    return total / 1024


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _server_version(argv: list[str]) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=False)
        return done.stdout.strip() or None
    return None


async def machine_facts(backing: Backing) -> dict[str, str]:
    """Cores, CPU model, Python, Postgres and Redis versions (as the servers report them)."""
    facts = {
        "cores": str(os.cpu_count() or "?"),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }
    with contextlib.suppress(Exception):
        conn = await asyncpg.connect(backing.admin_url)
        try:
            facts["postgres"] = str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()
    with contextlib.suppress(Exception):
        client = aioredis.Redis.from_url(backing.redis_url)
        try:
            info = await client.info("server")
            facts["redis"] = str(info.get("redis_version", "?"))
        finally:
            await client.aclose()
    facts.setdefault("postgres", "unknown")
    facts.setdefault("redis", "unknown")
    h2load = _server_version(["h2load", "--version"])
    if h2load:
        facts["h2load"] = h2load.splitlines()[0]
    return facts


@contextlib.contextmanager
def backing() -> Iterator[Backing]:
    """DATABASE_URL / REDIS_URL, or embedded servers for what is unset."""
    with backing_servers() as (database, redis_url):
        yield Backing(admin_url=database, redis_url=redis_url)
