"""The users projection's order figures: count, last order time and what was spent, per currency."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from read_service.keys import UserKeys
from read_service.projections.users import OrderNote, UsersProjection
from shared_kernel.contracts.event_log import NewEvent
from tessera.orders.v1.order_pb2 import OrderStatus
from tessera.users.v1.events_pb2 import UserProfileUpdated, UserRegistered
from tessera.users.v1.user_query_service_pb2 import UserView
from tests.unit.read_service.order_events import Events, MemoryViews

KEYS = UserKeys("unit:")


def registered(user_id: str, at: datetime) -> NewEvent:
    payload = UserRegistered(user_id=user_id, email="ada@example.com", username="ada", full_name="Ada Lovelace")
    payload.registered_at.FromDatetime(at)
    return NewEvent(payload, "user", user_id, 1, at)


@pytest.fixture
def views() -> MemoryViews:
    return MemoryViews(UsersProjection(KEYS))


def user(views: MemoryViews, user_id: str) -> UserView:
    return UserView.FromString(views.strings[KEYS.view(user_id)])


def spent(views: MemoryViews, user_id: str) -> dict[str, int | bytes]:
    return {k: v for k, v in views.hash(KEYS.spent(user_id)).items() if v != 0}


def test_orders_count_and_move_the_last_order_time_forward_only(views: MemoryViews) -> None:
    events = Events()
    user_id = str(uuid.uuid4())
    anvil, _ = events.add_product("A-1", "Anvil", 1000, 50)
    late = datetime(2024, 5, 2, tzinfo=UTC)
    early = datetime(2024, 5, 1, tzinfo=UTC)
    _, first = events.place(user_id, [(anvil, 1)], when=late)
    _, second = events.place(user_id, [(anvil, 1)], when=early)
    views.play([registered(user_id, early), first, second])

    view = user(views, user_id)
    assert view.order_count == 2
    assert view.last_order_at.ToDatetime(tzinfo=UTC) == late
    assert view.version == 1  # order events do not change the user's version
    assert views.duplicates == 3


def test_spent_follows_capture_confirm_and_refund_per_currency(views: MemoryViews) -> None:
    events = Events()
    user_id = str(uuid.uuid4())
    anvil, _ = events.add_product("A-1", "Anvil", 1999, 50)
    bolt, _ = events.add_product("B-1", "Bolt", 250, 50)
    yen, _ = events.add_product("J-1", "Kettle", 4800, 50, currency="JPY")
    views.play([registered(user_id, datetime(2024, 1, 1, tzinfo=UTC))])

    first, placed = events.place(user_id, [(anvil, 2)])
    views.play([placed, events.add_item(first, bolt, 4)])
    note = OrderNote.decode(views.strings[KEYS.order(first)])
    assert note == OrderNote(user_id, "EUR", 2 * 1999 + 4 * 250, paid=False)
    assert spent(views, user_id) == {}

    views.play([events.capture(first), events.confirm(first)])
    assert spent(views, user_id) == {"EUR": 4998}  # counted once

    second, placed_yen = events.place(user_id, [(yen, 3)])
    views.play([placed_yen, events.capture(second), events.confirm(second)])
    assert spent(views, user_id) == {"EUR": 4998, "JPY": 14400}

    views.play([events.cancel(first, OrderStatus.ORDER_STATUS_CONFIRMED), events.refund(first)])
    assert spent(views, user_id) == {"JPY": 14400}
    assert OrderNote.decode(views.strings[KEYS.order(first)]).paid is False

    # A profile update keeps the order figures on the view.
    update = UserProfileUpdated(user_id=user_id, full_name="Ada King")
    views.play([NewEvent(update, "user", user_id, 2, datetime(2024, 6, 1, tzinfo=UTC))])
    assert user(views, user_id).order_count == 2
    assert user(views, user_id).full_name == "Ada King"


def test_an_order_of_an_unknown_customer_is_noted_but_not_counted(views: MemoryViews) -> None:
    events = Events()
    anvil, _ = events.add_product("A-1", "Anvil", 1000, 50)
    stranger = str(uuid.uuid4())
    order_id, placed = events.place(stranger, [(anvil, 1)])
    views.play([placed, events.capture(order_id)])
    assert KEYS.view(stranger) not in views.strings
    assert spent(views, stranger) == {"EUR": 1000}
