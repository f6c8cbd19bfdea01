"""Commands on one aggregate take turns in a process and reuse its last committed state (decision 0027)."""

from __future__ import annotations

import asyncio
import copy
import uuid
from typing import Any

import asyncpg
import pytest

from shared_kernel.contracts import errors
from shared_kernel.platform.db import keep_session
from tests.unit.write_service import helpers
from write_service.adapters.unit_of_work import PostgresUnitOfWork
from write_service.commands.catalog import RestockProduct
from write_service.domain.catalog import Product
from write_service.service_layer.command_steps import Dependencies
from write_service.service_layer.deadline import Deadline
from write_service.service_layer.messagebus import CommandBus
from write_service.service_layer.ports import IdempotencyScope


def restock(product_id: uuid.UUID, quantity: int = 1, expected_version: int | None = None) -> RestockProduct:
    return RestockProduct.parse(
        {"product_id": str(product_id), "quantity": quantity, "expected_version": expected_version}
    )


@pytest.fixture
def deps() -> Dependencies:
    return Dependencies(hasher=helpers.cheap_hasher())


@pytest.fixture
def bus(db_pool: asyncpg.Pool[Any], deps: Dependencies) -> CommandBus:
    return CommandBus(lambda deadline: PostgresUnitOfWork(db_pool, deadline), deps, retry_backoff_s=0.001)


async def stored(db_pool: asyncpg.Pool[Any], product_id: uuid.UUID) -> Product:
    async with PostgresUnitOfWork(db_pool, Deadline.after(5)) as uow:
        product = await uow.products.get(product_id)
    assert product is not None
    return product


async def held_turn_then(deps: Dependencies, command: RestockProduct, state: Product) -> None:
    """Hold the command's turn until a dispatched command waits for it, then hand it over holding `state`."""
    async with deps.turns.turn(command, Deadline.after(5)) as turn, asyncio.timeout(5):
        while turn.users < 2:
            await asyncio.sleep(0.001)
        turn.state = copy.deepcopy(state)


async def test_queued_commands_on_one_aggregate_all_apply_and_skip_reads(database_url: str, deps: Dependencies):
    statements: list[str] = []

    async def init(conn: asyncpg.Connection[Any]) -> None:
        conn.add_query_logger(lambda record: statements.append(str(record.query)))

    pool: asyncpg.Pool[Any] = await asyncpg.create_pool(
        database_url, min_size=1, max_size=4, init=init, reset=keep_session
    )
    try:
        bus = CommandBus(lambda deadline: PostgresUnitOfWork(pool, deadline), deps)
        product_id = (await bus.dispatch(helpers.add_product(initial_stock=0), helpers.meta())).aggregate_id
        await bus.dispatch(restock(product_id), helpers.meta())  # every statement prepared once
        statements.clear()
        results = await asyncio.gather(*(bus.dispatch(restock(product_id), helpers.meta()) for _ in range(20)))
        reads = [s for s in statements if s.lstrip().startswith("SELECT id, sku")]
        product = await stored(pool, product_id)
    finally:
        await asyncio.wait_for(pool.close(), 10)
    assert sorted(r.version for r in results) == list(range(3, 23))
    assert (product.version, product.stock_available) == (22, 21)
    # While commands queued, each took the state the previous one committed instead of reading it.
    assert len(reads) < 20, len(reads)


async def test_a_rule_refusing_a_held_state_is_checked_on_a_fresh_read(bus, deps, db_pool):
    product_id = (await bus.dispatch(helpers.add_product(initial_stock=0), helpers.meta())).aggregate_id
    stale = await stored(db_pool, product_id)  # version 1
    await bus.dispatch(restock(product_id), helpers.meta())  # version 2, as another process could have written
    command = restock(product_id, expected_version=2)
    run = asyncio.create_task(bus.dispatch(command, helpers.meta()))
    await held_turn_then(deps, command, stale)
    result = await asyncio.wait_for(run, 10)
    assert result.version == 3


async def test_a_held_state_that_moved_on_is_not_written_over(bus, deps, db_pool):
    product_id = (await bus.dispatch(helpers.add_product(initial_stock=0), helpers.meta())).aggregate_id
    stale = await stored(db_pool, product_id)  # version 1, stock 0
    await bus.dispatch(restock(product_id, quantity=5), helpers.meta())  # version 2, stock 5
    command = restock(product_id, quantity=1)
    run = asyncio.create_task(bus.dispatch(command, helpers.meta()))
    await held_turn_then(deps, command, stale)
    result = await asyncio.wait_for(run, 10)
    product = await stored(db_pool, product_id)
    # The write based on version 1 failed its guard; the retry read version 2: no restock is lost.
    assert (result.version, product.version, product.stock_available) == (3, 3, 6)


async def test_the_retry_after_a_lost_guard_locks_what_it_reads(database_url: str, deps: Dependencies):
    statements: list[str] = []

    async def init(conn: asyncpg.Connection[Any]) -> None:
        conn.add_query_logger(lambda record: statements.append(" ".join(str(record.query).split())))

    pool: asyncpg.Pool[Any] = await asyncpg.create_pool(
        database_url, min_size=1, max_size=4, init=init, reset=keep_session
    )
    try:
        bus = CommandBus(lambda deadline: PostgresUnitOfWork(pool, deadline), deps, retry_backoff_s=0.001)
        product_id = (await bus.dispatch(helpers.add_product(initial_stock=0), helpers.meta())).aggregate_id
        stale = await stored(pool, product_id)
        await bus.dispatch(restock(product_id), helpers.meta())
        command = restock(product_id)
        statements.clear()
        run = asyncio.create_task(bus.dispatch(command, helpers.meta()))
        await held_turn_then(deps, command, stale)
        result = await asyncio.wait_for(run, 10)
    finally:
        await asyncio.wait_for(pool.close(), 10)
    assert result.version == 3
    # First attempt: no read (the held state), a write that lost its guard. The retry reads
    # in an explicit transaction with the row locked, so it cannot lose again.
    assert statements[0].startswith("WITH step_0 AS ( UPDATE products")
    assert statements[1].startswith("BEGIN;")
    assert statements[2].endswith("FROM products WHERE id = $1 FOR UPDATE")
    assert statements[-1] == "COMMIT"


async def counted_pool(database_url: str, statements: list[str]) -> asyncpg.Pool[Any]:
    async def init(conn: asyncpg.Connection[Any]) -> None:
        conn.add_query_logger(lambda record: statements.append(" ".join(str(record.query).split())))

    return await asyncpg.create_pool(database_url, min_size=1, max_size=8, init=init, reset=keep_session)


@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed", "keyed"])
async def test_concurrent_restocks_of_one_product_give_one_event_each_with_consecutive_versions(
    database_url: str, deps: Dependencies, keyed: bool
):
    statements: list[str] = []
    pool = await counted_pool(database_url, statements)
    try:
        bus = CommandBus(lambda deadline: PostgresUnitOfWork(pool, deadline), deps)
        product_id = (await bus.dispatch(helpers.add_product(initial_stock=0), helpers.meta())).aggregate_id
        statements.clear()
        quantities = [1 + i % 7 for i in range(64)]
        metas = [helpers.meta(idempotency_key=f"restock-{i}" if keyed else None) for i in range(64)]
        results = await asyncio.gather(
            *(bus.dispatch(restock(product_id, q), m) for q, m in zip(quantities, metas, strict=True))
        )
        # A keyed command's retry gets its first reply and has no second effect.
        replays = await asyncio.gather(
            *(
                bus.dispatch(restock(product_id, q), helpers.meta(idempotency_key=m.idempotency_key))
                for q, m in zip(quantities, metas, strict=True)
                if keyed
            )
        )
        writes = [s for s in statements if s.startswith("WITH step_0 AS ( UPDATE products")]
        async with pool.acquire() as conn:
            events = await conn.fetch(
                "SELECT event_id, aggregate_version, causation_id, payload FROM outbox WHERE aggregate_id = $1 "
                "AND event_type LIKE '%ProductRestocked' ORDER BY aggregate_version",
                str(product_id),
            )
            logged = await conn.fetch(
                "SELECT command_id, event_ids FROM command_log WHERE aggregate_id = $1 "
                "AND command_type = 'RestockProduct' AND outcome = 'succeeded'",
                str(product_id),
            )
        product = await stored(pool, product_id)
    finally:
        await asyncio.wait_for(pool.close(), 10)
    # Exactly one event per command, versions 2..65 with no gap or repeat, each reply its own version.
    assert [e["aggregate_version"] for e in events] == list(range(2, 66))
    assert sorted(r.version for r in results) == list(range(2, 66))
    assert len({e["causation_id"] for e in events}) == 64
    # Each command's log row names its own event, and that event's causation is the command.
    assert len(logged) == 64
    assert all(len(row["event_ids"]) == 1 for row in logged)
    causes = {e["event_id"]: e["causation_id"] for e in events}
    assert {causes[row["event_ids"][0]] for row in logged} == {str(row["command_id"]) for row in logged}
    assert (product.version, product.stock_available) == (65, sum(quantities))
    assert [r.version for r in replays] == ([r.version for r in results] if keyed else [])
    # Queued commands were written together: far fewer writes than commands. Unkeyed, nearly
    # all 64 queue behind the first write (2 writes seen). Keyed commands queue without a
    # connection too, but each first computes its key's fingerprint, so they reach the queue
    # more spread out on a loaded machine; the looser bound leaves room for that. Either
    # bound fails if commands are written one by one.
    bound = 64 * 3 / 4 if keyed else 64 / 2
    assert len(writes) < bound, len(writes)


async def test_a_refused_command_in_a_batch_does_not_affect_the_others(db_pool: asyncpg.Pool[Any], deps):
    bus = CommandBus(lambda deadline: PostgresUnitOfWork(db_pool, deadline), deps, retry_backoff_s=0.001)
    product_id = (await bus.dispatch(helpers.add_product(initial_stock=0), helpers.meta())).aggregate_id
    first = restock(product_id, 1)
    run_first = asyncio.create_task(bus.dispatch(first, helpers.meta()))
    # Hold the turn so the next commands queue and are decided together.
    async with deps.turns.turn(first, Deadline.after(5)) as turn, asyncio.timeout(5):
        while turn.users < 2:
            await asyncio.sleep(0.001)
        commands = [
            restock(product_id, 2),
            restock(product_id, 3, expected_version=99),  # refused by the rules, wherever it lands
            restock(product_id, 4),
        ]
        runs = [asyncio.create_task(bus.dispatch(c, helpers.meta())) for c in commands]
        while turn.users < 5:
            await asyncio.sleep(0.001)
    results = await asyncio.wait_for(asyncio.gather(run_first, *runs, return_exceptions=True), 10)
    product = await stored(db_pool, product_id)
    # The queued ones may reach the queue in any order; the refused one changes nothing.
    assert isinstance(results[2], errors.FailedPrecondition), results[2]
    assert sorted(getattr(r, "version", 0) for r in results) == [0, 2, 3, 4]
    assert (product.version, product.stock_available) == (4, 1 + 2 + 4)


async def test_a_batch_looks_up_its_keys_together_and_a_key_held_elsewhere_refuses_only_its_command(
    database_url: str, deps: Dependencies
):
    statements: list[str] = []
    pool = await counted_pool(database_url, statements)
    try:
        bus = CommandBus(lambda deadline: PostgresUnitOfWork(pool, deadline), deps, max_attempts=1)
        product_id = (await bus.dispatch(helpers.add_product(initial_stock=0), helpers.meta())).aggregate_id
        metas = [helpers.meta(idempotency_key=helpers.key()) for _ in range(3)]
        held = IdempotencyScope(metas[1].principal, "RestockProduct", str(metas[1].idempotency_key))
        # Another process runs the second key: its session holds the key's lock.
        async with pool.acquire() as holder:
            assert await holder.fetchval("SELECT pg_try_advisory_lock($1)", held.lock_id)
            first = restock(product_id, 1)
            run_first = asyncio.create_task(bus.dispatch(first, helpers.meta()))
            async with deps.turns.turn(first, Deadline.after(5)) as turn, asyncio.timeout(5):
                while turn.users < 2:
                    await asyncio.sleep(0.001)
                statements.clear()
                runs = [asyncio.create_task(bus.dispatch(restock(product_id, 2), m)) for m in metas]
                while turn.users < 5:
                    await asyncio.sleep(0.001)
            results = await asyncio.wait_for(asyncio.gather(run_first, *runs, return_exceptions=True), 10)
            assert await holder.fetchval("SELECT pg_advisory_unlock($1)", held.lock_id)
        look_ups = [s for s in statements if "FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])" in s]
        product = await stored(pool, product_id)
    finally:
        await asyncio.wait_for(pool.close(), 10)
    # One statement locked and looked up the three keys; only the held one was refused.
    assert len(look_ups) == 1, statements
    assert isinstance(results[2], errors.Conflict) and "still in progress" in results[2].message, results[2]
    assert sorted(getattr(r, "version", 0) for r in results) == [0, 2, 3, 4]
    assert (product.version, product.stock_available) == (4, 1 + 2 + 2)


async def test_a_second_call_with_a_key_still_queued_here_is_refused_at_once(bus, deps, db_pool):
    product_id = (await bus.dispatch(helpers.add_product(initial_stock=0), helpers.meta())).aggregate_id
    key = helpers.key()
    command = restock(product_id, 5)
    first_meta = helpers.meta(idempotency_key=key)
    async with deps.turns.turn(command, Deadline.after(5)) as turn, asyncio.timeout(5):
        first = asyncio.create_task(bus.dispatch(command, first_meta))
        while turn.users < 2:
            await asyncio.sleep(0.001)
        # Refused without queueing (the turn is still held here), as the key's lock refuses it elsewhere.
        no_retry = CommandBus(lambda deadline: PostgresUnitOfWork(db_pool, deadline), deps, max_attempts=1)
        with pytest.raises(errors.Conflict, match="still in progress"):
            await no_retry.dispatch(command, helpers.meta(idempotency_key=key))
        assert turn.users == 2
    result = await asyncio.wait_for(first, 10)
    replay = await bus.dispatch(command, helpers.meta(idempotency_key=key))
    assert (replay.version, replay.reply, replay.replay_of) == (result.version, result.reply, first_meta.command_id)
    assert (await stored(db_pool, product_id)).stock_available == 5
