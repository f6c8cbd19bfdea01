"""The orders projection: every order event, each delivered twice; statistics maths exact in minor units."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from read_service.keys import OrderKeys, OrderSortField, keyed_member, member_id
from read_service.projections.base import ALLOWED_COMMANDS, PoisonEvent
from read_service.projections.orders import OrdersProjection, searchable
from tessera.orders.v1.events_pb2 import OrderPlaced
from tessera.orders.v1.order_pb2 import OrderStatus
from tessera.orders.v1.order_query_service_pb2 import OrderView
from tests.unit.read_service.order_events import Events, MemoryViews, envelope

KEYS = OrderKeys("unit:")
CUSTOMER = str(uuid.uuid4())
S = OrderStatus


@pytest.fixture
def views() -> MemoryViews:
    return MemoryViews(OrdersProjection(KEYS))


@pytest.fixture
def events() -> Events:
    return Events()


def order(views: MemoryViews, order_id: str) -> OrderView:
    return OrderView.FromString(views.strings[KEYS.view(order_id)])


def stats(views: MemoryViews, day: str = "2024-03-10", currency: str = "EUR") -> dict[str, int | bytes]:
    return {k: v for k, v in views.hash(KEYS.stats(currency, day)).items() if v != 0}


def history(view: OrderView) -> list[tuple[int, str]]:
    return [(change.status, change.reason) for change in view.status_history]


def catalog(events: Events) -> tuple[str, str]:
    anvil, _ = events.add_product("ABC-1", "Anvil", 1999, 100)
    bolt, _ = events.add_product("bolt-7", "Bolt", 250, 100)
    return anvil, bolt


def test_order_placed_writes_the_view_indexes_and_counts(views: MemoryViews, events: Events) -> None:
    anvil, bolt = catalog(events)
    order_id, placed = events.place(CUSTOMER, [(anvil, 2), (bolt, 3)], name="Ada Lovelace", email="ada@example.com")
    views.play([placed])

    view = order(views, order_id)
    assert (view.order_id, view.customer_id, view.customer_name, view.customer_email) == (
        order_id,
        CUSTOMER,
        "Ada Lovelace",
        "ada@example.com",
    )
    assert [(line.sku, line.product_name, line.quantity, line.line_total.amount_minor) for line in view.lines] == [
        ("ABC-1", "Anvil", 2, 3998),
        ("bolt-7", "Bolt", 3, 750),
    ]
    assert (view.total.currency_code, view.total.amount_minor) == ("EUR", 4748)
    assert view.status == S.ORDER_STATUS_PENDING
    assert history(view) == [(S.ORDER_STATUS_PENDING, "")]
    assert view.shipping_address.city == "London"
    assert view.notes == "leave at the door"
    assert view.version == 1
    assert view.paid is False
    assert view.placed_at == view.updated_at

    placed_us = view.placed_at.ToMicroseconds()
    assert views.zsets[KEYS.by_customer(CUSTOMER)] == {keyed_member(placed_us, order_id)}
    assert views.zsets[KEYS.index(OrderSortField.PLACED_AT)] == {keyed_member(placed_us, order_id)}
    assert views.zsets[KEYS.index(OrderSortField.TOTAL)] == {keyed_member(4748, order_id)}
    assert views.zsets[KEYS.index(OrderSortField.UPDATED_AT)] == {keyed_member(placed_us, order_id)}
    assert stats(views) == {"placed": 1, "status:PENDING": 1}
    assert views.duplicates == 1


def test_happy_path_reserves_once_pays_once_confirms_and_ships(views: MemoryViews, events: Events) -> None:
    anvil, bolt = catalog(events)
    order_id, placed = events.place(CUSTOMER, [(anvil, 2), (bolt, 3)])
    views.play([placed])

    reserved = events.reserve(order_id)
    views.play(reserved)  # two StockReserved: only the first moves the status
    view = order(views, order_id)
    assert view.status == S.ORDER_STATUS_RESERVED
    assert history(view) == [(S.ORDER_STATUS_PENDING, ""), (S.ORDER_STATUS_RESERVED, "")]
    assert view.version == 1  # product events do not carry the order's version
    assert stats(views) == {"placed": 1, "status:RESERVED": 1}

    views.play([events.authorize(order_id)])
    assert order(views, order_id).status == S.ORDER_STATUS_RESERVED
    views.play([events.capture(order_id)])
    assert order(views, order_id).paid is True
    paid = {"placed": 1, "status:RESERVED": 1, "paid": 1, "revenue": 4748, "qty:ABC-1": 2, "qty:bolt-7": 3}
    assert stats(views) == {**paid, "name:ABC-1": b"Anvil", "name:bolt-7": b"Bolt"}

    views.play([events.confirm(order_id)])
    view = order(views, order_id)
    assert view.status == S.ORDER_STATUS_CONFIRMED
    assert view.paid is True
    figures = stats(views)
    assert figures["revenue"] == 4748  # capture and confirmation count the payment once
    assert figures["paid"] == 1
    assert figures["status:CONFIRMED"] == 1
    assert "status:RESERVED" not in figures

    views.play([events.ship(order_id, "DHL", "JD0001")])
    view = order(views, order_id)
    assert (view.status, view.carrier, view.tracking_number) == (S.ORDER_STATUS_SHIPPED, "DHL", "JD0001")
    assert [s for s, _ in history(view)] == [
        S.ORDER_STATUS_PENDING,
        S.ORDER_STATUS_RESERVED,
        S.ORDER_STATUS_CONFIRMED,
        S.ORDER_STATUS_SHIPPED,
    ]
    assert view.version == 5
    figures = stats(views)
    assert (figures["status:SHIPPED"], figures["revenue"], figures["placed"]) == (1, 4748, 1)
    assert "status:CONFIRMED" not in figures
    # updated_at index moved with every change: one member for the order, at its last change.
    assert views.zsets[KEYS.index(OrderSortField.UPDATED_AT)] == {
        keyed_member(view.updated_at.ToMicroseconds(), order_id)
    }


def test_item_added_moves_the_total_index(views: MemoryViews, events: Events) -> None:
    anvil, bolt = catalog(events)
    order_id, placed = events.place(CUSTOMER, [(anvil, 1)])
    views.play([placed, events.add_item(order_id, bolt, 2), events.add_item(order_id, anvil, 1)])

    view = order(views, order_id)
    assert [(line.sku, line.quantity) for line in view.lines] == [("ABC-1", 2), ("bolt-7", 2)]
    assert view.total.amount_minor == 2 * 1999 + 2 * 250
    assert views.zsets[KEYS.index(OrderSortField.TOTAL)] == {keyed_member(4498, order_id)}
    assert view.status == S.ORDER_STATUS_PENDING
    assert view.version == 3
    assert stats(views) == {"placed": 1, "status:PENDING": 1}


def _indexed(views: MemoryViews) -> dict[str, set[str]]:
    """The search index as trigram -> order ids."""
    return {key.removeprefix(KEYS.trigram("")): set(ids) for key, ids in views.ranks.items()}


def test_the_search_index_follows_the_order_texts_and_ignores_status_changes(
    views: MemoryViews, events: Events
) -> None:
    anvil, bolt = catalog(events)
    order_id, placed = events.place(CUSTOMER, [(anvil, 1)], name="Ada Lovelace", email="ada@example.com")
    views.play([placed])
    view = order(views, order_id)
    assert _indexed(views) == {g: {order_id} for g in searchable(view)}
    assert {"ada", "@ex", "abc", "anv"} <= set(_indexed(views))
    assert "bol" not in _indexed(views)

    views.play([events.add_item(order_id, bolt, 2)])
    assert _indexed(views)["bol"] == {order_id} and _indexed(views)["t-7"] == {order_id}

    indexed = _indexed(views)
    views.play(events.reserve(order_id))
    views.play([events.cancel(order_id, S.ORDER_STATUS_RESERVED)])
    assert order(views, order_id).status == S.ORDER_STATUS_CANCELLED
    assert _indexed(views) == indexed


def test_rejected_after_a_failed_reservation(views: MemoryViews, events: Events) -> None:
    anvil, _ = catalog(events)
    order_id, placed = events.place(CUSTOMER, [(anvil, 1000)])
    views.play([placed, *events.reservation_failed(order_id, "not enough stock of ABC-1: 1000 asked, 100 left")])

    view = order(views, order_id)
    assert view.status == S.ORDER_STATUS_REJECTED
    assert view.reason == "not enough stock of ABC-1: 1000 asked, 100 left"
    assert history(view)[-1] == (S.ORDER_STATUS_REJECTED, "not enough stock of ABC-1: 1000 asked, 100 left")
    assert stats(views) == {"placed": 1, "status:REJECTED": 1}


def test_declined_payment_cancels_without_revenue(views: MemoryViews, events: Events) -> None:
    anvil, _ = catalog(events)
    order_id, placed = events.place(CUSTOMER, [(anvil, 1)])
    views.play([placed, *events.reserve(order_id), events.decline(order_id, "card expired")])
    assert order(views, order_id).reason == "card expired"
    views.play([*events.release(order_id)])
    views.play([events.cancel(order_id, S.ORDER_STATUS_RESERVED, "payment declined: card expired", by="system")])

    view = order(views, order_id)
    assert (view.status, view.cancelled_by, view.paid) == (S.ORDER_STATUS_CANCELLED, "system", False)
    assert history(view)[-1] == (S.ORDER_STATUS_CANCELLED, "payment declined: card expired")
    assert stats(views) == {"placed": 1, "status:CANCELLED": 1}


def test_cancelling_a_confirmed_order_refunds_exactly(views: MemoryViews, events: Events) -> None:
    anvil, bolt = catalog(events)
    kept, placed_kept = events.place(CUSTOMER, [(bolt, 1)])
    order_id, placed = events.place(CUSTOMER, [(anvil, 3)])
    views.play([placed_kept, *events.happy_path(kept), placed, *events.happy_path(order_id)])
    assert stats(views)["revenue"] == 250 + 3 * 1999

    views.play([events.cancel(order_id, S.ORDER_STATUS_CONFIRMED)])
    assert order(views, order_id).paid is True  # paid until the refund is recorded
    views.play([*events.release(order_id), events.refund(order_id)])

    view = order(views, order_id)
    assert (view.status, view.paid, view.cancelled_by) == (S.ORDER_STATUS_CANCELLED, False, "alice")
    figures = stats(views)
    assert figures["revenue"] == 250
    assert figures["paid"] == 1
    assert "qty:ABC-1" not in figures
    assert figures["qty:bolt-7"] == 1
    assert (figures["placed"], figures["status:CONFIRMED"], figures["status:CANCELLED"]) == (2, 1, 1)


def test_voided_authorization_changes_only_the_time(views: MemoryViews, events: Events) -> None:
    anvil, _ = catalog(events)
    order_id, placed = events.place(CUSTOMER, [(anvil, 1)])
    views.play([placed, *events.reserve(order_id), events.authorize(order_id)])
    views.play([events.cancel(order_id, S.ORDER_STATUS_RESERVED), *events.release(order_id)])
    before = order(views, order_id)
    views.play([events.void(order_id)])
    after = order(views, order_id)
    assert after.updated_at.ToDatetime() > before.updated_at.ToDatetime()
    assert (after.status, after.paid) == (S.ORDER_STATUS_CANCELLED, False)


def test_statistics_are_per_currency_and_placing_day(views: MemoryViews, events: Events) -> None:
    anvil, bolt = catalog(events)
    dollars, _ = events.add_product("USD-1", "Import", 333, 100, currency="USD")
    day1 = datetime(2024, 3, 10, 23, 59, tzinfo=UTC)
    day2 = datetime(2024, 3, 11, 0, 0, tzinfo=UTC)
    first, placed1 = events.place(CUSTOMER, [(anvil, 1)], when=day1)
    second, placed2 = events.place(CUSTOMER, [(bolt, 4)], when=day2)
    third, placed3 = events.place(CUSTOMER, [(dollars, 3)], when=day2)
    # The second order is paid a day after it was placed: its revenue stays on its placing day.
    views.play([placed1, placed2, placed3, *events.happy_path(second), *events.happy_path(third)])

    assert stats(views, "2024-03-10") == {"placed": 1, "status:PENDING": 1}
    assert stats(views, "2024-03-11") == {
        "placed": 1,
        "status:CONFIRMED": 1,
        "paid": 1,
        "revenue": 1000,
        "qty:bolt-7": 4,
        "name:bolt-7": b"Bolt",
    }
    assert stats(views, "2024-03-11", "USD")["revenue"] == 999
    assert first


def test_a_stale_version_or_an_unknown_order_changes_nothing(views: MemoryViews, events: Events) -> None:
    anvil, _ = catalog(events)
    order_id, placed = events.place(CUSTOMER, [(anvil, 1)])
    views.play([placed])
    stale = envelope(events.ship(order_id), 2)
    stale.aggregate_version = 1
    views.deliver(stale)
    assert order(views, order_id).status == S.ORDER_STATUS_PENDING

    unknown, _ = Events(products=events.products).place(CUSTOMER, [(anvil, 1)])
    other = Events(products=events.products, lines={unknown: events.lines[order_id]})
    views.deliver(envelope(other.confirm(unknown), 3))
    assert KEYS.view(unknown) not in views.strings
    assert views.checkpoint == 3


def test_a_payload_for_another_order_is_poison(events: Events) -> None:
    anvil, _ = catalog(events)
    order_id, placed = events.place(CUSTOMER, [(anvil, 1)])
    env = envelope(placed, 1)
    env.aggregate_id = str(uuid.uuid4())
    with pytest.raises(PoisonEvent):
        OrdersProjection(KEYS).project(env, {})
    env.aggregate_id = order_id
    env.schema_version = 2
    with pytest.raises(PoisonEvent):
        OrdersProjection(KEYS).project(env, {})


def test_members_carry_the_order_id_and_ops_are_allowed(events: Events) -> None:
    anvil, _ = catalog(events)
    order_id, placed = events.place(CUSTOMER, [(anvil, 1)])
    effect = OrdersProjection(KEYS).project(envelope(placed, 1), {})
    assert {op[0] for op in effect.ops} <= ALLOWED_COMMANDS
    trigram = KEYS.trigram("")
    members = [op[3] for op in effect.ops if op[0] == "ZADD" and not str(op[1]).startswith(trigram)]
    assert members and all(isinstance(m, bytes) and member_id(m) == order_id for m in members)
    # The trigram sets hold the id's 16 bytes, scored by the placing time in microseconds.
    placed_at = OrderPlaced.FromString(placed.payload.SerializeToString()).placed_at.ToMicroseconds()
    grams = [op[2:] for op in effect.ops if str(op[1]).startswith(trigram)]
    assert grams and set(grams) == {(placed_at, uuid.UUID(order_id).bytes)}
