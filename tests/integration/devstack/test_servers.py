"""Embedded Postgres and Redis: kill, restart, pause, persistence, failed starts."""

from __future__ import annotations

import shutil
import socket

import asyncpg
import pytest

from devstack.processes import pid_alive, process_tree, wait_gone
from devstack.servers import EmbeddedPostgres, EmbeddedRedis, ServerError, find_free_port
from tests.integration.devstack.support import shared_tmpdir

pytestmark = pytest.mark.integration


def test_find_free_port_is_bindable():
    port = find_free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


async def _fetch_rows(url: str) -> list[int]:
    connection = await asyncpg.connect(url, timeout=5)
    try:
        return [row["n"] for row in await connection.fetch("SELECT n FROM survivors ORDER BY n")]
    finally:
        await connection.close()


async def test_postgres_survives_kill_and_restart_then_cleans_up():
    postgres = EmbeddedPostgres()
    with postgres:
        connection = await asyncpg.connect(postgres.url, timeout=5)
        await connection.execute("CREATE TABLE survivors (n int); INSERT INTO survivors VALUES (1), (2)")
        await connection.close()
        pids = process_tree(postgres.pid or 0)
        assert len(pids) > 1  # the postmaster and its helper processes

        postgres.kill()
        assert not postgres.running
        assert wait_gone(pids, 5.0) == []
        with pytest.raises(OSError):
            await asyncpg.connect(postgres.url, timeout=2)

        port = postgres.port
        postgres.restart()
        assert postgres.port == port
        assert await _fetch_rows(postgres.url) == [1, 2]  # committed rows outlive a crash
        data_dir = postgres.data_dir
        pids = process_tree(postgres.pid or 0)
    assert not data_dir.exists()
    assert wait_gone(pids, 5.0) == []


async def test_postgres_pause_makes_connections_hang_until_resume(embedded_pg: EmbeddedPostgres):
    embedded_pg.pause()
    try:
        with pytest.raises(TimeoutError):
            await asyncpg.connect(embedded_pg.url, timeout=0.5)
    finally:
        embedded_pg.resume()
    connection = await asyncpg.connect(embedded_pg.url, timeout=5)
    assert await connection.fetchval("SELECT 1") == 1
    await connection.close()


async def test_postgres_persistent_dir_is_kept_and_reused():
    base = shared_tmpdir()
    try:
        with EmbeddedPostgres(data_dir=base / "pg") as postgres:
            connection = await asyncpg.connect(postgres.url, timeout=5)
            await connection.execute("CREATE TABLE survivors (n int); INSERT INTO survivors VALUES (7)")
            await connection.close()
        assert (base / "pg" / "pgdata" / "PG_VERSION").exists()
        orphan = EmbeddedPostgres(data_dir=base / "pg").start()  # as if its supervisor were SIGKILLed
        orphan_pids = process_tree(orphan.pid or 0)
        with EmbeddedPostgres(data_dir=base / "pg") as again:  # takes the directory back
            assert wait_gone(orphan_pids, 1.0) == []
            assert await _fetch_rows(again.url) == [7]
        orphan.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_redis_with_appendonly_keeps_data_across_kill():
    with EmbeddedRedis(appendonly=True) as server:
        client = server.client()
        client.set("k", "v")
        server.kill()
        assert not server.running
        server.restart()
        client = server.client()
        assert client.get("k") == b"v"
        client.close()
        data_dir = server.data_dir
    assert not data_dir.exists()


def test_redis_without_persistence_forgets_on_restart_and_pauses():
    with EmbeddedRedis() as server:
        client = server.client(timeout=0.5)
        client.set("k", "v")
        server.restart()
        client = server.client(timeout=0.5)
        assert client.get("k") is None

        server.pause()
        try:
            with pytest.raises(Exception, match=r"[Tt]imeout"):
                client.ping()
        finally:
            server.resume()
        client = server.client()
        assert client.ping()
        client.close()
        pid = server.pid
    assert pid is not None and not pid_alive(pid)


def test_start_failure_reports_the_log_and_cleans_up():
    server = EmbeddedRedis(extra_args=["--no-such-directive", "x"])
    with pytest.raises(ServerError, match=r"(?s)exited with code.*no-such-directive") as info:
        server.start()
    assert "redis" in str(info.value)
    assert not server.running
    assert server._data_dir is None  # the temporary directory is gone
