"""Catalog and order handlers over the in-memory unit of work: rules, events, and the saga hand-off."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from shared_kernel.contracts import errors
from tessera.catalog.v1 import events_pb2 as catalog_events
from tessera.orders.v1 import events_pb2 as order_events
from tessera.orders.v1 import order_pb2
from tests.unit.write_service import helpers
from write_service.adapters.memory import InMemoryDatabase, InMemoryUnitOfWork
from write_service.commands.catalog import DiscontinueProduct, RestockProduct, UpdateProductPrice
from write_service.commands.orders import AddOrderItem, CancelOrder, ShipOrder
from write_service.domain.catalog import STOCK_MAX
from write_service.service_layer.command_steps import Dependencies
from write_service.service_layer.messagebus import CommandBus

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def db() -> InMemoryDatabase:
    return InMemoryDatabase()


@pytest.fixture
def bus(db) -> CommandBus:
    return CommandBus(
        lambda deadline: InMemoryUnitOfWork(db, deadline),
        Dependencies(hasher=helpers.cheap_hasher(), clock=lambda: NOW),
    )


async def product(bus: CommandBus, **kwargs) -> uuid.UUID:
    result = await bus.dispatch(helpers.add_product(**kwargs), helpers.meta())
    return result.aggregate_id


async def customer(bus: CommandBus) -> uuid.UUID:
    result = await bus.dispatch(helpers.register(), helpers.meta())
    return result.aggregate_id


def payloads(db: InMemoryDatabase, aggregate_id: uuid.UUID) -> list[object]:
    return [r.event.payload for r in db.outbox if r.event.aggregate_id == str(aggregate_id)]


def reprice(product_id: uuid.UUID, currency_code: str, amount_minor: int, **kwargs) -> UpdateProductPrice:
    return UpdateProductPrice.parse(
        {"product_id": str(product_id), "price": {"currency_code": currency_code, "amount_minor": amount_minor}}
        | kwargs
    )


def restock(product_id: uuid.UUID, quantity: int, **kwargs) -> RestockProduct:
    return RestockProduct.parse({"product_id": str(product_id), "quantity": quantity} | kwargs)


def discontinue(product_id: uuid.UUID, reason: str = "") -> DiscontinueProduct:
    return DiscontinueProduct.parse({"product_id": str(product_id), "reason": reason})


async def test_add_product_records_product_added_at_version_one(bus, db):
    result = await bus.dispatch(helpers.add_product(sku="Eng-1", amount_minor=0, initial_stock=0), helpers.meta())
    assert result.version == 1
    stored = db.products[result.aggregate_id]
    assert (stored.sku, stored.price_minor, stored.stock_available, stored.version) == ("Eng-1", 0, 0, 1)
    [event] = db.outbox
    assert event.event.aggregate_type == "product"
    assert isinstance(event.event.payload, catalog_events.ProductAdded)
    assert event.event.payload.price.currency_code == "EUR"
    assert db.command_log[-1].aggregate_type == "product"


async def test_sku_is_unique_case_insensitively(bus, db):
    await product(bus, sku="Eng-1")
    with pytest.raises(errors.AlreadyExists) as exc_info:
        await bus.dispatch(helpers.add_product(sku="eNG-1"), helpers.meta())
    assert exc_info.value.field == "sku"
    assert len(db.products) == 1
    assert db.command_log[-1].status_code == "ALREADY_EXISTS"


async def test_price_restock_and_discontinue(bus, db):
    product_id = await product(bus, initial_stock=5)
    assert (await bus.dispatch(reprice(product_id, "EUR", 2500), helpers.meta())).version == 2
    result = await bus.dispatch(restock(product_id, 7), helpers.meta())
    assert result.version == 3
    [restocked] = [e for e in result.events if isinstance(e.payload, catalog_events.ProductRestocked)]
    assert restocked.payload.stock_available == 12
    await bus.dispatch(discontinue(product_id, "replaced"), helpers.meta())
    stored = db.products[product_id]
    assert (stored.price_minor, stored.stock_available, stored.discontinued, stored.version) == (2500, 12, True, 4)
    assert [type(p).__name__ for p in payloads(db, product_id)] == [
        "ProductAdded",
        "ProductPriceUpdated",
        "ProductRestocked",
        "ProductDiscontinued",
    ]


async def test_a_price_change_keeps_the_currency(bus, db):
    product_id = await product(bus, currency_code="EUR")
    with pytest.raises(errors.FailedPrecondition, match="must keep the product's currency"):
        await bus.dispatch(reprice(product_id, "USD", 100), helpers.meta())
    assert db.products[product_id].version == 1


@pytest.mark.parametrize(
    "command",
    [
        lambda pid: reprice(pid, "EUR", 5),
        lambda pid: restock(pid, 1),
        discontinue,
    ],
)
async def test_a_discontinued_product_is_frozen(bus, db, command):
    product_id = await product(bus)
    await bus.dispatch(discontinue(product_id), helpers.meta())
    with pytest.raises(errors.FailedPrecondition, match="discontinued"):
        await bus.dispatch(command(product_id), helpers.meta())
    assert db.products[product_id].version == 2


async def test_stale_expected_version_and_unknown_product(bus):
    product_id = await product(bus)
    with pytest.raises(errors.FailedPrecondition, match="at version 1, not the expected version 3"):
        await bus.dispatch(restock(product_id, 1, expected_version=3), helpers.meta())
    assert (await bus.dispatch(restock(product_id, 1, expected_version=1), helpers.meta())).version == 2
    with pytest.raises(errors.NotFound):
        await bus.dispatch(restock(uuid.uuid4(), 1), helpers.meta())


async def test_place_order_prices_from_the_catalog_and_starts_the_saga(bus, db):
    customer_id = await customer(bus)
    await product(bus, sku="A-1", amount_minor=1999, name="Engine")
    await product(bus, sku="B-2", amount_minor=5, name="Card")
    result = await bus.dispatch(
        helpers.place_order(customer_id, ("a-1", 3), ("B-2", 7), notes="ring\ttwice"), helpers.meta()
    )
    assert result.version == 1
    order = db.orders[result.aggregate_id]
    assert (order.status, order.currency_code, order.total_minor) == ("pending", "EUR", 3 * 1999 + 7 * 5)
    assert [(line.line_no, line.sku, line.quantity, line.unit_price_minor) for line in order.lines] == [
        (1, "A-1", 3, 1999),
        (2, "B-2", 7, 5),
    ]
    [placed] = payloads(db, result.aggregate_id)
    assert isinstance(placed, order_events.OrderPlaced)
    assert placed.customer_name == "Ada Lovelace"
    assert placed.total.amount_minor == 6032
    assert [line.line_total.amount_minor for line in placed.lines] == [5997, 35]
    assert placed.lines[0].product_name == "Engine"
    assert placed.shipping_address.country_code == "GB"
    saga = db.sagas[result.aggregate_id]
    assert (saga.saga_type, saga.status, saga.current_step, saga.version, saga.attempts) == (
        "place_order",
        "running",
        "reserve_stock",
        1,
        0,
    )
    assert saga.next_attempt_at == NOW
    # Placing never touches stock: the saga reserves it.
    assert {p.stock_available for p in db.products.values()} == {10}


async def test_place_order_rules_name_the_rule(bus, db):
    customer_id = await customer(bus)
    await product(bus, sku="EUR-1", currency_code="EUR")
    await product(bus, sku="USD-1", currency_code="USD")
    gone = await product(bus, sku="GONE-1")
    await bus.dispatch(discontinue(gone), helpers.meta())
    cases = [
        (helpers.place_order(uuid.uuid4(), ("EUR-1", 1)), "must be an active user"),
        (helpers.place_order(customer_id, ("NOPE-1", 1), ("EUR-1", 1)), "unknown sku: 'NOPE-1'"),
        (helpers.place_order(customer_id, ("gone-1", 1)), "'GONE-1' is discontinued"),
        (helpers.place_order(customer_id, ("EUR-1", 1), ("USD-1", 1)), "must share one currency"),
    ]
    for command, message in cases:
        with pytest.raises(errors.FailedPrecondition, match=message):
            await bus.dispatch(command, helpers.meta())
    await bus.dispatch(helpers.deactivate(customer_id), helpers.meta())
    with pytest.raises(errors.FailedPrecondition, match=f"customer {customer_id} must be an active user"):
        await bus.dispatch(helpers.place_order(customer_id, ("EUR-1", 1)), helpers.meta())
    assert db.orders == {}
    assert db.sagas == {}


async def placed(bus: CommandBus, *items: tuple[str, int]) -> uuid.UUID:
    customer_id = await customer(bus)
    result = await bus.dispatch(helpers.place_order(customer_id, *items), helpers.meta())
    return result.aggregate_id


def add_item(order_id: uuid.UUID, sku: str, quantity: int) -> AddOrderItem:
    return AddOrderItem.parse({"order_id": str(order_id), "item": {"sku": sku, "quantity": quantity}})


async def test_add_order_item_adds_or_grows_a_line(bus, db):
    await product(bus, sku="A-1", amount_minor=100)
    await product(bus, sku="B-2", amount_minor=7)
    order_id = await placed(bus, ("A-1", 1))
    await bus.dispatch(reprice(db.orders[order_id].lines[0].product_id, "EUR", 999), helpers.meta())
    result = await bus.dispatch(add_item(order_id, "a-1", 2), helpers.meta())
    assert result.version == 2
    await bus.dispatch(add_item(order_id, "B-2", 10), helpers.meta())
    order = db.orders[order_id]
    # The existing line keeps the price it was placed at.
    assert [(line.sku, line.quantity, line.unit_price_minor) for line in order.lines] == [
        ("A-1", 3, 100),
        ("B-2", 10, 7),
    ]
    added = payloads(db, order_id)[-1]
    assert isinstance(added, order_events.OrderItemAdded)
    assert (added.line.sku, added.total.amount_minor) == ("B-2", 370)
    with pytest.raises(errors.FailedPrecondition, match="at most 10000 units"):
        await bus.dispatch(add_item(order_id, "B-2", 9991), helpers.meta())


async def test_items_are_added_only_while_pending(bus, db):
    await product(bus, sku="A-1")
    order_id = await placed(bus, ("A-1", 1))
    db.orders[order_id].status = "reserved"
    with pytest.raises(errors.FailedPrecondition, match="items can only be added while the order is pending"):
        await bus.dispatch(add_item(order_id, "A-1", 1), helpers.meta())


async def test_cancel_hands_the_compensation_to_the_saga(bus, db):
    await product(bus, sku="A-1")
    order_id = await placed(bus, ("A-1", 1))
    db.sagas[order_id].status = "completed"
    db.orders[order_id].status = "confirmed"
    command = CancelOrder.parse({"order_id": str(order_id), "reason": "changed my mind"})
    result = await bus.dispatch(command, helpers.meta(principal="alice"))
    order = db.orders[order_id]
    assert (result.version, order.status, order.reason, order.cancelled_by) == (
        2,
        "cancelled",
        "changed my mind",
        "alice",
    )
    cancelled = payloads(db, order_id)[-1]
    assert isinstance(cancelled, order_events.OrderCancelled)
    assert cancelled.previous_status == order_pb2.ORDER_STATUS_CONFIRMED
    assert cancelled.cancelled_by == "alice"
    saga = db.sagas[order_id]
    assert (saga.status, saga.current_step, saga.attempts, saga.version) == ("compensating", "compensate", 0, 2)
    assert saga.steps == [("cancel_requested", "compensate", "succeeded", "changed my mind", 1)]


@pytest.mark.parametrize(
    ("status", "message"),
    [
        ("shipped", "a shipped order cannot be cancelled"),
        ("cancelled", "already cancelled"),
        ("rejected", "already rejected"),
    ],
)
async def test_final_orders_cannot_be_cancelled(bus, db, status, message):
    await product(bus, sku="A-1")
    order_id = await placed(bus, ("A-1", 1))
    db.orders[order_id].status = status
    with pytest.raises(errors.FailedPrecondition, match=message):
        await bus.dispatch(CancelOrder.parse({"order_id": str(order_id), "reason": "x"}), helpers.meta())
    assert db.sagas[order_id].status == "running"


async def test_only_a_confirmed_order_ships(bus, db):
    await product(bus, sku="A-1")
    order_id = await placed(bus, ("A-1", 1))
    ship = ShipOrder.parse({"order_id": str(order_id), "carrier": "DHL", "tracking_number": "JD-0001 23"})
    with pytest.raises(errors.FailedPrecondition, match=r"only a confirmed order can be shipped; .* is pending"):
        await bus.dispatch(ship, helpers.meta())
    db.orders[order_id].status = "confirmed"
    result = await bus.dispatch(ship, helpers.meta())
    order = db.orders[order_id]
    assert (result.version, order.status, order.carrier, order.tracking_number) == (2, "shipped", "DHL", "JD-0001 23")
    assert isinstance(payloads(db, order_id)[-1], order_events.OrderShipped)


async def test_stock_has_a_ceiling(bus, db):
    product_id = await product(bus, initial_stock=0)
    db.products[product_id].stock_available = STOCK_MAX - 1
    await bus.dispatch(restock(product_id, 1), helpers.meta())
    with pytest.raises(errors.FailedPrecondition, match=f"cannot exceed {STOCK_MAX} units"):
        await bus.dispatch(restock(product_id, 1), helpers.meta())
