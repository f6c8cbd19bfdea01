"""Commands queued on one aggregate are decided in turn and written together (decision 0033)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from shared_kernel.contracts import errors
from tests.unit.write_service import helpers
from write_service.adapters.memory import InMemoryDatabase, InMemoryUnitOfWork
from write_service.commands.catalog import RestockProduct
from write_service.service_layer.command_steps import CommandResult, Dependencies
from write_service.service_layer.deadline import Deadline
from write_service.service_layer.messagebus import CommandBus


@pytest.fixture
def db() -> InMemoryDatabase:
    return InMemoryDatabase()


@pytest.fixture
def deps() -> Dependencies:
    return Dependencies(hasher=helpers.cheap_hasher())


@pytest.fixture
def bus(db: InMemoryDatabase, deps: Dependencies) -> CommandBus:
    return CommandBus(lambda deadline: InMemoryUnitOfWork(db, deadline), deps, retry_backoff_s=0.001)


def restock(product_id: uuid.UUID, quantity: int) -> RestockProduct:
    return RestockProduct.parse({"product_id": str(product_id), "quantity": quantity})


async def queued_together(
    bus: CommandBus, deps: Dependencies, commands: list[RestockProduct]
) -> list[CommandResult | BaseException]:
    """Dispatch `commands` while their aggregate's turn is held, so they queue and are written as one batch."""
    async with deps.turns.turn(commands[0], Deadline.after(5)) as turn, asyncio.timeout(5):
        runs = [asyncio.create_task(bus.dispatch(c, helpers.meta())) for c in commands]
        while turn.users < len(commands) + 1:
            await asyncio.sleep(0.001)
    return await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), 10)


async def test_queued_commands_share_one_commit(bus, deps, db):
    product_id = (await bus.dispatch(helpers.add_product(initial_stock=0), helpers.meta())).aggregate_id
    commits = db.commits
    results = await queued_together(bus, deps, [restock(product_id, q) for q in (1, 2, 3)])
    assert sorted(r.version for r in results if isinstance(r, CommandResult)) == [2, 3, 4]
    assert db.commits == commits + 1
    assert db.products[product_id].stock_available == 6


async def test_a_batch_failing_on_something_one_command_did_retries_each_alone(bus, deps, db):
    product_id = (await bus.dispatch(helpers.add_product(initial_stock=0), helpers.meta())).aggregate_id
    commits = db.commits
    # The batch's write fails as a unique index would; nothing of it is written.
    db.commit_failures.append(errors.AlreadyExists("a unique value is taken"))
    results = await queued_together(bus, deps, [restock(product_id, q) for q in (1, 2, 3)])
    assert sorted(r.version for r in results if isinstance(r, CommandResult)) == [2, 3, 4], results
    # Each retried in a write of its own: three commits after the failed one.
    assert db.commits == commits + 3
    assert db.products[product_id].stock_available == 6


async def test_a_lost_guard_retries_the_whole_batch(bus, deps, db):
    product_id = (await bus.dispatch(helpers.add_product(initial_stock=0), helpers.meta())).aggregate_id
    db.commit_failures.append(errors.Conflict("product changed concurrently, retry the request"))
    results = await queued_together(bus, deps, [restock(product_id, q) for q in (1, 2, 3)])
    assert sorted(r.version for r in results if isinstance(r, CommandResult)) == [2, 3, 4], results
    assert db.products[product_id].stock_available == 6
    assert [r.event.aggregate_version for r in db.outbox if r.event.aggregate_id == str(product_id)] == [1, 2, 3, 4]
