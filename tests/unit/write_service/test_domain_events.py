"""Domain events to in-process policies, integration events to the outbox (in-memory unit of work)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from shared_kernel.contracts.event_log import NewEvent
from tessera.catalog.v1 import events_pb2 as catalog_events
from tessera.orders.v1 import events_pb2 as order_events
from tessera.users.v1 import events_pb2 as user_events
from tests.unit.write_service import helpers
from write_service.adapters.memory import InMemoryDatabase, InMemoryUnitOfWork
from write_service.domain.aggregate import Aggregate
from write_service.domain.events import PUBLIC_EVENTS
from write_service.domain.users import User
from write_service.service_layer.command_steps import Dependencies
from write_service.service_layer.event_bus import handle_domain_events, integration_events
from write_service.service_layer.messagebus import CommandBus
from write_service.service_layer.ports import UnitOfWork

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def db() -> InMemoryDatabase:
    return InMemoryDatabase()


@pytest.fixture
def bus(db: InMemoryDatabase) -> CommandBus:
    return CommandBus(
        lambda deadline: InMemoryUnitOfWork(db, deadline),
        Dependencies(hasher=helpers.cheap_hasher(), clock=lambda: NOW),
    )


def test_every_event_of_the_protos_is_declared_public_or_private_on_purpose() -> None:
    """The read side projects every event the protos define; each of them is declared public."""
    defined = {
        message._concrete_class
        for module in (user_events, catalog_events, order_events)
        for message in module.DESCRIPTOR.message_types_by_name.values()
        if message.name != "StockShortage"  # a part of StockReservationFailed, not an event
    }
    assert {m.DESCRIPTOR.full_name for m in defined} == {m.DESCRIPTOR.full_name for m in PUBLIC_EVENTS}


async def test_deactivating_a_customer_cancels_their_orders_awaiting_payment(bus: CommandBus, db: InMemoryDatabase):
    customer = (await bus.dispatch(helpers.register(), helpers.meta())).aggregate_id
    await bus.dispatch(helpers.add_product(sku="EUR-1", initial_stock=10), helpers.meta())
    pending = (await bus.dispatch(helpers.place_order(customer, ("EUR-1", 1)), helpers.meta())).aggregate_id
    reserved = (await bus.dispatch(helpers.place_order(customer, ("EUR-1", 2)), helpers.meta())).aggregate_id
    confirmed = (await bus.dispatch(helpers.place_order(customer, ("EUR-1", 3)), helpers.meta())).aggregate_id
    db.orders[reserved].status = "reserved"
    db.orders[confirmed].status = "confirmed"
    before = len(db.outbox)

    result = await bus.dispatch(helpers.deactivate(customer, reason="fraud"), helpers.meta())

    for order_id in (pending, reserved):
        order = db.orders[order_id]
        assert (order.status, order.reason, order.cancelled_by) == (
            "cancelled",
            "customer deactivated: fraud",
            "system",
        )
        saga = db.sagas[order_id]
        assert (saga.status, saga.current_step) == ("compensating", "compensate")
    assert db.orders[confirmed].status == "confirmed"
    assert db.sagas[confirmed].status == "running"
    written = [type(r.event.payload).__name__ for r in db.outbox[before:]]
    assert written == ["UserDeactivated", "OrderCancelled", "OrderCancelled"]
    # One unit of work: the command's log names every event it wrote.
    assert {r.event.event_id for r in db.outbox[before:]} == set(db.command_log[-1].event_ids)
    assert result.version == 2


async def test_a_refused_deactivation_cancels_nothing(bus: CommandBus, db: InMemoryDatabase):
    customer = (await bus.dispatch(helpers.register(), helpers.meta())).aggregate_id
    await bus.dispatch(helpers.add_product(sku="EUR-1", initial_stock=10), helpers.meta())
    order_id = (await bus.dispatch(helpers.place_order(customer, ("EUR-1", 1)), helpers.meta())).aggregate_id
    with pytest.raises(Exception, match="expected version"):
        await bus.dispatch(helpers.deactivate(customer, expected_version=7), helpers.meta())
    assert db.orders[order_id].status == "pending"


async def test_a_private_event_reaches_policies_but_not_the_outbox_nor_the_version() -> None:
    user = User(
        id=uuid.uuid4(),
        email="a@example.com",
        username="ada",
        password_hash="x",
        full_name="Ada",
        version=3,
        updated_at=NOW,
        created_at=NOW,
    )
    private = order_events.StockShortage(sku="A", requested=1, available=0)  # a message no one publishes
    user._record(private, NOW)
    assert user.version == 3
    seen: list[NewEvent] = []

    async def policy(event: NewEvent, uow: UnitOfWork, now: datetime) -> list[Aggregate]:
        seen.append(event)
        user.deactivate(reason="policy", now=now)
        return [user]

    uow = InMemoryUnitOfWork(InMemoryDatabase())
    recorded = list(user.pending_events)
    user.pending_events.clear()
    events = await handle_domain_events(uow, recorded, NOW, {order_events.StockShortage: [policy]})
    assert [type(e.payload).__name__ for e in seen] == ["StockShortage"]
    assert [type(e.payload).__name__ for e in events] == ["StockShortage", "UserDeactivated"]
    assert [type(e.payload).__name__ for e in integration_events(events)] == ["UserDeactivated"]
    assert events[1].aggregate_version == 4
