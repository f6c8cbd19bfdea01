"""Commands on one aggregate take turns in a process and reuse its last committed state (decision 0027)."""

from __future__ import annotations

import asyncio
import copy
import uuid
from typing import Any

import asyncpg
import pytest

from shared_kernel.db import keep_session
from tests.unit.write_service import helpers
from write_service.adapters.unit_of_work import PostgresUnitOfWork
from write_service.commands.catalog import RestockProduct
from write_service.domain.catalog import Product
from write_service.service_layer.command_steps import Dependencies
from write_service.service_layer.deadline import Deadline
from write_service.service_layer.messagebus import CommandBus


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
