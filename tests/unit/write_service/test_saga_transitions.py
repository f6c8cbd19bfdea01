"""The transitions the order saga drives, decided by the Order and Product aggregates alone."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from shared_kernel.contracts.errors import FailedPrecondition
from tessera.catalog.v1 import events_pb2 as catalog_events
from tessera.orders.v1 import events_pb2 as order_events
from tessera.orders.v1 import order_pb2
from write_service.domain.catalog import Product
from write_service.domain.orders import Address, Customer, Order

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
ADDRESS = Address(recipient="A", line1="1 Road", line2="", city="Berlin", postal_code="10115", country_code="DE")


def product(stock: int, price_minor: int = 250, sku: str | None = None) -> Product:
    product_id = uuid.uuid4()
    added = Product.add(
        product_id=product_id,
        sku=sku or f"SKU-{product_id.hex[:6]}",
        name="Thing",
        currency_code="EUR",
        price_minor=price_minor,
        initial_stock=stock,
        now=NOW,
    )
    added.pending_events.clear()
    return added


def order(*items: tuple[Product, int]) -> Order:
    customer = Customer(id=uuid.uuid4(), full_name="C", email="c@example.com", active=True)
    placed = Order.place(
        order_id=uuid.uuid4(), customer=customer, items=list(items), shipping_address=ADDRESS, notes="", now=NOW
    )
    placed.pending_events.clear()
    return placed


def payloads(*aggregates: Order | Product) -> list[str]:
    return [type(e.payload).__name__ for a in aggregates for e in a.pending_events]


def test_reserve_takes_every_line_and_keeps_the_order_version() -> None:
    apple, pear = product(10), product(5)
    placed = order((apple, 3), (pear, 2))
    assert placed.reserve_stock({apple.id: apple, pear.id: pear}, now=NOW) == ""
    assert placed.status == "reserved"
    assert placed.version == 1  # no order event: the StockReserved events carry the order id
    assert (apple.stock_available, pear.stock_available) == (7, 3)
    assert placed.reservations == {apple.id: 3, pear.id: 2}
    reserved = apple.pending_events[0].payload
    assert isinstance(reserved, catalog_events.StockReserved)
    assert (reserved.order_id, reserved.quantity, reserved.stock_available) == (str(placed.id), 3, 7)
    assert apple.version == 2


def test_a_shortage_rejects_naming_it_and_takes_nothing() -> None:
    apple, pear = product(10, sku="APPLE"), product(1, sku="PEAR")
    placed = order((apple, 3), (pear, 2))
    reason = placed.reserve_stock({apple.id: apple, pear.id: pear}, now=NOW)
    assert reason == "insufficient stock for sku PEAR (requested 2, available 1)"
    assert placed.status == "rejected"
    assert placed.reason == reason
    assert payloads(placed) == ["StockReservationFailed", "OrderRejected"]
    assert (apple.stock_available, pear.stock_available) == (10, 1)
    assert apple.pending_events == pear.pending_events == []
    failed = placed.pending_events[0].payload
    assert isinstance(failed, order_events.StockReservationFailed)
    assert [(s.sku, s.requested, s.available) for s in failed.shortages] == [("PEAR", 2, 1)]


def test_a_discontinued_product_rejects() -> None:
    apple = product(10, sku="APPLE")
    placed = order((apple, 1))
    apple.discontinue(reason="gone", now=NOW)
    assert placed.reserve_stock({apple.id: apple}, now=NOW) == "discontinued product: APPLE"
    assert placed.status == "rejected"


def test_only_a_pending_order_reserves() -> None:
    apple = product(10)
    placed = order((apple, 1))
    placed.cancel(reason="no", cancelled_by="me", now=NOW)
    with pytest.raises(FailedPrecondition):
        placed.reserve_stock({apple.id: apple}, now=NOW)


def test_authorize_then_confirm() -> None:
    apple = product(10, price_minor=400)
    placed = order((apple, 2))
    placed.reserve_stock({apple.id: apple}, now=NOW)
    placed.authorize_payment(authorization_id="auth-1", now=NOW)
    statuses = [placed.status]
    placed.confirm(authorization_id="auth-1", now=NOW)
    statuses.append(placed.status)
    assert statuses == ["reserved", "confirmed"]
    assert payloads(placed) == ["PaymentAuthorized", "PaymentCaptured", "OrderConfirmed"]
    assert placed.version == 4
    confirmed = placed.pending_events[-1].payload
    assert isinstance(confirmed, order_events.OrderConfirmed)
    assert (confirmed.total.currency_code, confirmed.total.amount_minor) == ("EUR", 800)


def test_payment_transitions_need_a_reserved_order() -> None:
    apple = product(10)
    placed = order((apple, 1))
    with pytest.raises(FailedPrecondition, match="only a reserved order"):
        placed.authorize_payment(authorization_id="a", now=NOW)
    with pytest.raises(FailedPrecondition, match="only a reserved order"):
        placed.decline_payment(reason="no", now=NOW)
    with pytest.raises(FailedPrecondition, match="only a reserved order"):
        placed.confirm(authorization_id="a", now=NOW)


def test_a_declined_payment_releases_once_and_cancels_as_the_system() -> None:
    apple, pear = product(10), product(5)
    placed = order((apple, 3), (pear, 2))
    stock = {apple.id: apple, pear.id: pear}
    placed.reserve_stock(stock, now=NOW)
    placed.decline_payment(reason="card expired", now=NOW)
    assert placed.release_stock(stock, now=NOW) == (5, 2)
    assert placed.cancel_by_system(reason="payment declined: card expired", now=NOW)
    assert (apple.stock_available, pear.stock_available) == (10, 5)
    assert placed.release_stock(stock, now=NOW) == (0, 0)  # released exactly once
    assert payloads(apple) == ["StockReserved", "StockReleased"]
    assert payloads(placed) == ["PaymentDeclined", "OrderCancelled"]
    cancelled = placed.pending_events[-1].payload
    assert isinstance(cancelled, order_events.OrderCancelled)
    assert (cancelled.cancelled_by, cancelled.previous_status) == ("system", order_pb2.ORDER_STATUS_RESERVED)


def test_one_cancellation_rule_for_callers_and_the_saga() -> None:
    apple = product(10)
    for status, cancellable in [
        ("pending", True),
        ("reserved", True),
        ("confirmed", True),
        ("shipped", False),
        ("cancelled", False),
        ("rejected", False),
    ]:
        placed = order((apple, 1))
        placed.status = status  # type: ignore[assignment]
        assert placed.is_cancellable is cancellable
        assert placed.cancel_by_system(reason="r", now=NOW) is cancellable
        if not cancellable:
            with pytest.raises(FailedPrecondition):
                placed.cancel(reason="r", cancelled_by="me", now=NOW)


def test_release_returns_units_even_of_a_discontinued_product() -> None:
    apple = product(10)
    placed = order((apple, 4))
    placed.reserve_stock({apple.id: apple}, now=NOW)
    apple.discontinue(reason="gone", now=NOW)
    placed.release_stock({apple.id: apple}, now=NOW)
    assert apple.stock_available == 10


def test_product_reserve_refuses_more_than_stock() -> None:
    apple = product(2)
    with pytest.raises(FailedPrecondition, match="insufficient stock"):
        apple.reserve(order_id=uuid.uuid4(), quantity=3, now=NOW)
    assert apple.stock_available == 2
    assert apple.pending_events == []


def test_void_and_refund_are_order_events() -> None:
    apple = product(10)
    placed = order((apple, 1))
    placed.record_void(authorization_id="auth-1", now=NOW)
    placed.record_refund(refund_id="ref-1", currency_code="EUR", amount_minor=250, now=NOW)
    assert payloads(placed) == ["PaymentVoided", "PaymentRefunded"]
    assert placed.version == 3
