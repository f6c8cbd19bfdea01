"""Round trips to Postgres per command, counted on the connection (decision 0027).

Every statement the command sends is recorded by an asyncpg query logger on a pool of one
connection. The pool resets sessions as the write service's does (`keep_session`: nothing sent on
release). Each command type runs once before it is counted, so the prepared statements
are cached and every recorded statement is one round trip (a first use costs one more, to
prepare).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from shared_kernel.platform.db import keep_session
from tests.unit.write_service import helpers
from write_service.adapters.unit_of_work import PostgresUnitOfWork
from write_service.commands.catalog import DiscontinueProduct, RestockProduct, UpdateProductPrice
from write_service.commands.orders import AddOrderItem, CancelOrder
from write_service.service_layer.command_steps import CommandMeta, CommandResult, Dependencies
from write_service.service_layer.messagebus import CommandBus

# The most a command may cost: one read, one write that commits; a key adds one. The two
# order commands read two aggregates (the order or customer, and the catalog): one more.
# So does DeactivateUser: its policy reads the customer's orders awaiting payment.
PLAIN_COMMAND_MAX = 2
KEYED_COMMAND_MAX = 3
TWO_READS = {"PlaceOrder", "AddOrderItem", "DeactivateUser"}


class Recorder:
    """The statements every connection of a pool sends, in order."""

    def __init__(self) -> None:
        self.statements: list[str] = []

    def __call__(self, record: Any) -> None:
        self.statements.append(" ".join(str(record.query).split())[:100])

    async def count(self, call: Callable[[], Awaitable[object]]) -> int:
        """How many statements `call` sends."""
        self.statements.clear()
        await call()
        return len(self.statements)


@pytest.fixture
async def counted(database_url: str) -> Any:
    recorder = Recorder()

    async def init(conn: asyncpg.Connection[Any]) -> None:
        conn.add_query_logger(recorder)

    pool: asyncpg.Pool[Any] = await asyncpg.create_pool(
        database_url, min_size=1, max_size=1, init=init, reset=keep_session
    )
    try:
        bus = CommandBus(lambda d: PostgresUnitOfWork(pool, d), Dependencies(hasher=helpers.cheap_hasher()))
        yield bus, recorder
    finally:
        await asyncio.wait_for(pool.close(), 10)


async def _twice(recorder: Recorder, run: Callable[[], Awaitable[object]]) -> int:
    """Run once to warm the statement cache, then count the second run."""
    await run()
    return await recorder.count(run)


def _meta(key: str | None = None) -> CommandMeta:
    return helpers.meta(idempotency_key=key)


async def round_trips(bus: CommandBus, recorder: Recorder) -> dict[str, int]:
    """Round trips of one successful command of each type (the figures decision 0027 reports)."""
    counts: dict[str, int] = {}

    async def register() -> CommandResult:
        return await bus.dispatch(helpers.register(), _meta())

    counts["RegisterUser"] = await _twice(recorder, register)
    user_id = (await register()).aggregate_id
    counts["UpdateUserProfile"] = await _twice(
        recorder, lambda: bus.dispatch(helpers.update(user_id, full_name=f"n {uuid.uuid4()}"), _meta())
    )

    async def deactivate() -> CommandResult:
        fresh = (await register()).aggregate_id
        recorder.statements.clear()
        return await bus.dispatch(helpers.deactivate(fresh), _meta())

    await deactivate()
    await deactivate()
    counts["DeactivateUser"] = len(recorder.statements)

    counts["AddProduct"] = await _twice(recorder, lambda: bus.dispatch(helpers.add_product(), _meta()))
    counts["AddProduct (keyed)"] = await _twice(
        recorder, lambda: bus.dispatch(helpers.add_product(), _meta(helpers.key()))
    )
    key = helpers.key()
    command = helpers.add_product()
    await bus.dispatch(command, _meta(key))
    counts["AddProduct (keyed replay)"] = await _twice(recorder, lambda: bus.dispatch(command, _meta(key)))

    product = helpers.add_product(initial_stock=1000)
    product_id = (await bus.dispatch(product, _meta())).aggregate_id
    pid = str(product_id)
    counts["UpdateProductPrice"] = await _twice(
        recorder,
        lambda: bus.dispatch(
            UpdateProductPrice.parse({"product_id": pid, "price": {"currency_code": "EUR", "amount_minor": 5}}),
            _meta(),
        ),
    )
    counts["RestockProduct"] = await _twice(
        recorder, lambda: bus.dispatch(RestockProduct.parse({"product_id": pid, "quantity": 3}), _meta())
    )

    customer = (await register()).aggregate_id

    async def place() -> CommandResult:
        return await bus.dispatch(helpers.place_order(customer, (product.sku, 1)), _meta())

    counts["PlaceOrder"] = await _twice(recorder, place)
    other = helpers.add_product()
    await bus.dispatch(other, _meta())
    orders = [(await place()).aggregate_id for _ in range(2)]

    async def add_item(order_id: uuid.UUID) -> CommandResult:
        command = AddOrderItem.parse({"order_id": str(order_id), "item": {"sku": other.sku, "quantity": 1}})
        return await bus.dispatch(command, _meta())

    await add_item(orders[0])
    counts["AddOrderItem"] = await recorder.count(lambda: add_item(orders[1]))

    async def cancel(order_id: uuid.UUID) -> CommandResult:
        return await bus.dispatch(CancelOrder.parse({"order_id": str(order_id), "reason": "changed mind"}), _meta())

    await cancel(orders[0])
    counts["CancelOrder"] = await recorder.count(lambda: cancel(orders[1]))

    async def discontinue() -> CommandResult:
        fresh = (await bus.dispatch(helpers.add_product(), _meta())).aggregate_id
        recorder.statements.clear()
        return await bus.dispatch(DiscontinueProduct.parse({"product_id": str(fresh)}), _meta())

    await discontinue()
    await discontinue()
    counts["DiscontinueProduct"] = len(recorder.statements)
    return counts


async def test_add_product_takes_two_round_trips(counted):
    bus, recorder = counted
    counts = await round_trips(bus, recorder)
    print("round trips per command:", counts)
    assert counts["AddProduct"] == PLAIN_COMMAND_MAX, recorder.statements
    assert counts["AddProduct (keyed)"] <= KEYED_COMMAND_MAX
    plain = {name: n for name, n in counts.items() if "keyed" not in name and name not in TWO_READS}
    assert all(n <= PLAIN_COMMAND_MAX for n in plain.values()), plain
    assert all(n <= PLAIN_COMMAND_MAX + 1 for n in counts.values()), counts
