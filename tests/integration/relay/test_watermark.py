"""The published watermark: a relay killed before advancing it re-publishes; migrations 0005 and 0006 keep old data."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from pydantic import PostgresDsn, RedisDsn

from devstack.databases import create_database, drop_database
from relay.runner import Relay
from relay.settings import RelaySettings
from shared_kernel.platform import migrations
from tessera.events.v1.envelope_pb2 import EventEnvelope, StreamHead
from tests.integration.relay.conftest import RelayHarness
from tests.integration.relay.support import ChannelRecorder, assert_gap_free, ids_of, insert_events, wait_until
from tests.integration.relay.test_process import RelayProcess, relay_env

pytestmark = pytest.mark.integration

# Two-int advisory key the test holds to stop the watermark's update inside the relay's
# statement (apart from the relay's one-bigint key and support's aggregate locks).
_HOLD = (4243, 0)

# Makes every update that moves the watermark wait for the test's advisory lock, so the
# relay is caught after it published and before its watermark is written.
_HOLD_WATERMARK = f"""
CREATE FUNCTION hold_watermark() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.published_position <> OLD.published_position THEN
        PERFORM pg_advisory_xact_lock_shared({_HOLD[0]}, {_HOLD[1]});
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER hold_watermark BEFORE UPDATE ON relay_state
    FOR EACH ROW EXECUTE FUNCTION hold_watermark();
"""


_WAITING = """
SELECT pid FROM pg_locks
WHERE locktype = 'advisory' AND NOT granted AND classid = $1 AND objid = $2
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


async def _state(db: asyncpg.Pool[Any] | asyncpg.Connection[Any]) -> tuple[int, int]:
    row = await db.fetchrow("SELECT published_position, last_position FROM relay_state")
    assert row is not None
    return int(row["published_position"]), int(row["last_position"])


async def _eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def test_a_relay_killed_before_advancing_the_watermark_is_followed_by_a_republish(
    relays: RelayHarness,
    database_url: str,
    redis_server_url: str,
    redis_prefix: str,
    published: ChannelRecorder[EventEnvelope],
) -> None:
    written = await insert_events(relays.pool, "a", 30)
    await relays.pool.execute(_HOLD_WATERMARK)
    holder = await asyncpg.connect(database_url)
    env = relay_env(database_url, redis_server_url, redis_prefix, RELAY_POLL_INTERVAL_S="0.5")
    first: RelayProcess | None = None
    second: RelayProcess | None = None
    try:
        await holder.execute("SELECT pg_advisory_lock($1, $2)", *_HOLD)
        first = await RelayProcess.start(env)
        await published.wait_for(lambda m: len(m) == 30, what="the first relay's publish")
        blocked: list[int] = []

        async def watermark_write_waits() -> bool:
            blocked[:] = [r["pid"] for r in await relays.pool.fetch(_WAITING, *_HOLD)]
            return bool(blocked)

        async def blocked_sessions_ended() -> bool:
            alive = await relays.pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::integer[])", blocked
            )
            return not alive

        await _eventually(watermark_write_waits, "the relay's watermark update to wait")
        await first.kill()
        # The server would end the dead client's statement only when it next wrote to it:
        # end it now, so its update never commits (the crash this test is about).
        await relays.pool.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::integer[]) AS pid", blocked)
        await _eventually(blocked_sessions_ended, "the dead relay's session to end")
        await holder.execute("SELECT pg_advisory_unlock($1, $2)", *_HOLD)
        await relays.pool.execute("DROP TRIGGER hold_watermark ON relay_state")
        assert await _state(relays.pool) == (0, 30), "positions committed, watermark not advanced"

        second = await RelayProcess.start(env)
        await wait_until(lambda: second is not None and second.role == "active", 30, "the second relay to lead")
        later = await insert_events(relays.pool, "a", 5)
        await published.wait_for(lambda m: len(m) == 65, what="the re-publish and the later events")
        # 1..30 went out twice, at the same positions; nothing is missing; 31.. follow once.
        by_position = assert_gap_free(published.messages, ids_of(written + later))
        assert [m.position for m in published.messages] == [*range(1, 31), *range(1, 36)]
        assert [by_position[p] for p in range(1, 31)] == [str(e.event_id) for e in written]

        async def watermark_caught_up() -> bool:
            return await _state(relays.pool) == (35, 35)

        await _eventually(watermark_caught_up, "the watermark to reach 35")
    finally:
        for process in (first, second):
            if process is not None:
                await process.kill()
        await holder.close()


async def test_migrations_keep_published_rows_published_and_republish_the_rest(
    postgres_admin_url: str,
    redis_server_url: str,
    redis_prefix: str,
    published: ChannelRecorder[EventEnvelope],
    tmp_path: Path,
) -> None:
    url = await create_database(postgres_admin_url, migrate=False)
    try:
        before_0005 = tmp_path / "migrations"
        before_0005.mkdir()
        for migration in migrations.discover()[:4]:
            shutil.copy(migration.path, before_0005)
        conn = await asyncpg.connect(url)
        try:
            await migrations.apply(conn, before_0005)
            # The old schema, as the old relay left it: 1-4 published, 5-6 positioned but not
            # marked published (a crash), 7 published after them (marks may land out of
            # order), 8-9 not positioned yet.
            events = [(uuid.uuid4(), StreamHead(position=n).SerializeToString()) for n in range(1, 10)]
            for n, (event_id, payload) in enumerate(events, start=1):
                position = n if n <= 7 else None
                await conn.execute(
                    "INSERT INTO outbox (event_id, event_type, schema_version, aggregate_type, aggregate_id,"
                    " aggregate_version, payload, occurred_at, position, positioned_at, published_at)"
                    " VALUES ($1, 'tessera.events.v1.StreamHead', 1, 'thing', 'm', $2, $3, now(), $4,"
                    " CASE WHEN $4::bigint IS NULL THEN NULL ELSE now() END,"
                    " CASE WHEN $4::bigint IN (1, 2, 3, 4, 7) THEN now() END)",
                    event_id,
                    n,
                    payload,
                    position,
                )
            await conn.execute("UPDATE relay_state SET last_position = 7")

            through_0005 = tmp_path / "through_0005"
            through_0005.mkdir()
            for migration in migrations.discover()[:5]:
                shutil.copy(migration.path, through_0005)
            assert await migrations.apply(conn, through_0005) == [5]

            assert await _state(conn) == (4, 7)
            columns = {
                r["column_name"]
                for r in await conn.fetch(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = 'outbox'"
                )
            }
            assert not columns & {"published_at", "positioned_at"}
            indexes = {
                r["indexname"] for r in await conn.fetch("SELECT indexname FROM pg_indexes WHERE tablename = 'outbox'")
            }
            assert indexes == {
                "outbox_pkey",
                "outbox_position_key",
                "outbox_unpositioned_idx",
                "outbox_aggregate_type_aggregate_id_aggregate_version_key",
            }
            ids_by_position = {
                r["position"]: r["id"]
                for r in await conn.fetch("SELECT position, id FROM outbox WHERE position IS NOT NULL")
            }
            unpositioned = [
                r["id"] for r in await conn.fetch("SELECT id FROM outbox WHERE position IS NULL ORDER BY id")
            ]
            before = [tuple(r) for r in await conn.fetch("SELECT * FROM outbox ORDER BY id")]

            # 0006: positions move to their own table, unpositioned ids to the queue, and the
            # outbox (now a view) reads as the table did.
            assert await migrations.apply(conn) == [m.version for m in migrations.discover()[5:]]
            assert {
                r["position"]: r["outbox_id"]
                for r in await conn.fetch("SELECT position, outbox_id FROM outbox_position")
            } == ids_by_position
            assert [r["id"] for r in await conn.fetch("SELECT id FROM outbox_pending ORDER BY id")] == unpositioned
            assert [tuple(r) for r in await conn.fetch("SELECT * FROM outbox ORDER BY id")] == before
            assert await _state(conn) == (4, 7)
            indexes = {
                (r["tablename"], r["indexname"])
                for r in await conn.fetch(
                    "SELECT tablename, indexname FROM pg_indexes"
                    " WHERE tablename IN ('outbox_event', 'outbox_position', 'outbox_pending')"
                )
            }
            assert indexes == {
                ("outbox_event", "outbox_pkey"),
                ("outbox_event", "outbox_aggregate_type_aggregate_id_aggregate_version_key"),
                ("outbox_position", "outbox_position_pkey"),
                ("outbox_position", "outbox_position_position_key"),
                ("outbox_pending", "outbox_pending_pkey"),
            }
        finally:
            await conn.close()

        pool: asyncpg.Pool[Any] = await asyncpg.create_pool(url, min_size=1, max_size=4)
        try:
            redis = aioredis.Redis.from_url(redis_server_url)
            try:
                settings = RelaySettings(
                    database_url=PostgresDsn(url), redis_url=RedisDsn(redis_server_url), redis_key_prefix=redis_prefix
                )
                relay = Relay(settings, pool, redis)
                assert await relay.run_once() == 5
            finally:
                await redis.aclose()
            await published.wait_for(lambda m: len(m) == 5)
            # Nothing at or below the watermark again; 5-7 again at their positions; 8-9 new.
            assert [m.position for m in published.messages] == [5, 6, 7, 8, 9]
            assert [m.event_id for m in published.messages] == [str(e) for e, _ in events[4:]]
            assert await _state(pool) == (9, 9)
        finally:
            await pool.close()
    finally:
        await drop_database(postgres_admin_url, url)
