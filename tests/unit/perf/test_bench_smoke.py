"""Benches end to end at tiny sizes, against a real Postgres and Redis."""

from __future__ import annotations

import asyncio
import socket
import time

import asyncpg
import pytest

from perf.bench.live_bench import LiveSizes, measure_live
from perf.bench.loadgen import run_load
from perf.bench.pgbench import add_product_script, find_pgbench, hot_restock_script, run_pgbench
from perf.bench.relay_bench import RelaySizes, measure_relay
from perf.bench.table import render_markdown, render_text
from perf.lag import at_rates, describe, own_stack, wait_until_settled
from perf.loadtest.probe import NotVisible
from perf.stack import Backing

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_relay_bench_measures_a_small_backlog(postgres_admin_url: str, redis_server_url: str) -> None:
    backing = Backing(admin_url=postgres_admin_url, redis_url=redis_server_url)
    rate, against_bare = rows = await measure_relay(backing, RelaySizes(events=2_000, rounds=1, timeout_s=60.0))
    for row in rows:
        assert row.error is None
        assert row.value is not None and row.value > 0
        assert row.ceiling is not None and row.ceiling > 0
        assert row.ratio is not None
        assert row.met is not None  # both goals are judged once measured
        assert "2,000-event backlog" in row.how
        assert row.figure in render_text(rows)
        assert row.figure in render_markdown(rows, ["header"])
    assert rate.goal is not None and rate.goal.subject == "value"
    assert against_bare.goal is not None and against_bare.goal.subject == "ratio"


async def test_live_bench_times_a_replica_beside_the_relay(postgres_admin_url: str, redis_server_url: str) -> None:
    backing = Backing(admin_url=postgres_admin_url, redis_url=redis_server_url)
    rate, against_relay = rows = await measure_live(backing, LiveSizes(events=600, timeout_s=60.0))
    for row in rows:
        assert row.error is None
        assert row.value is not None and row.value > 0
        assert row.ceiling is not None and row.ceiling > 0
        assert row.met is not None
        assert "600 events" in row.how
    assert rate.goal is not None and rate.goal.subject == "value"
    assert against_relay.goal is not None and against_relay.goal.subject == "ratio"


async def test_bare_transactions_write_what_the_service_writes(database_url: str) -> None:
    result = await asyncio.to_thread(run_load, database_url, processes=1, concurrency=2, duration_s=1.0, pool_size=2)
    assert result.errors == 0, result.first_error
    assert result.ok > 0
    conn = await asyncpg.connect(database_url)
    try:
        products = await conn.fetchval("SELECT count(*) FROM products")
        # Every product has its event, its command-log row and its stored reply, as a keyed AddProduct leaves them.
        assert products >= result.ok
        assert (
            await conn.fetchval("SELECT count(*) FROM outbox WHERE event_type = 'tessera.catalog.v1.ProductAdded'")
            == products
        )
        assert await conn.fetchval("SELECT count(*) FROM command_log WHERE outcome = 'succeeded'") == products
        assert (
            await conn.fetchval("SELECT count(*) FROM idempotency_keys WHERE command_type = 'AddProduct'") == products
        )
    finally:
        await conn.close()


async def test_lag_cpu_reports_each_rate_with_the_processes_cpu(postgres_admin_url: str, redis_server_url: str) -> None:
    backing = Backing(admin_url=postgres_admin_url, redis_url=redis_server_url)
    lines: list[str] = []
    async with own_stack(backing, "add_product") as target:
        (result,) = await at_rates(target, "add_product", [5.0], 2.0, lines.append)
    assert result["rate"] == 5.0
    assert result["commands"] >= 5
    assert not result["errors"]
    assert len(result["visible_ms"]) == 2  # both replicas answered with the token
    cpu = result["cpu_cores"]
    assert {"write", "relay-1", "read-1", "read-2", "lag client", "postgres+redis", "machine"} <= set(cpu)
    assert cpu["machine"] > 0
    assert result["cpu_ms_per_command"]["machine"] == round(cpu["machine"] * 1000.0 / 5.0, 2)
    assert lines == [describe(result)]


async def test_settling_waits_for_every_replica_and_gives_up_at_its_deadline(
    postgres_admin_url: str, redis_server_url: str
) -> None:
    backing = Backing(admin_url=postgres_admin_url, redis_url=redis_server_url)
    async with own_stack(backing, "add_product") as target:
        took = await wait_until_settled(target.write, target.reads, within_s=30.0)
        assert 0 < took < 30.0
        # A replica that never answers: settling must not report the stack settled.
        silent = f"127.0.0.1:{free_port()}"
        started = time.perf_counter()
        with pytest.raises(NotVisible, match=silent):
            await wait_until_settled(target.write, [*target.reads, silent], within_s=1.0)
        assert time.perf_counter() - started < 20.0


@pytest.mark.skipif(find_pgbench() is None, reason="pgbench is not installed")
async def test_pgbench_scripts_write_what_a_keyed_command_writes(database_url: str) -> None:
    tps = await asyncio.to_thread(run_pgbench, database_url, add_product_script(), clients=2, duration_s=1.0)
    assert tps > 0
    conn = await asyncpg.connect(database_url)
    try:
        products = await conn.fetchval("SELECT count(*) FROM products")
        assert products > 0
        for query in (
            "SELECT count(*) FROM outbox WHERE event_type = 'tessera.catalog.v1.ProductAdded'",
            "SELECT count(*) FROM command_log WHERE command_type = 'AddProduct'",
            "SELECT count(*) FROM idempotency_keys WHERE command_type = 'AddProduct'",
        ):
            assert await conn.fetchval(query) == products, query
        hot = await conn.fetchval("SELECT id FROM products LIMIT 1")
        await asyncio.to_thread(run_pgbench, database_url, hot_restock_script(str(hot)), clients=2, duration_s=1.0)
        row = await conn.fetchrow("SELECT version, stock_available FROM products WHERE id = $1", hot)
        assert row is not None
        version, stock = row["version"], row["stock_available"]
        restocks = await conn.fetchval("SELECT count(*) FROM outbox WHERE aggregate_id = $1", str(hot))
        # One event per restock (the product was added at version 1); every key lock released.
        assert restocks == version - 1 > 0
        assert stock == 10 + restocks
        held = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        assert held == 0
    finally:
        await conn.close()
