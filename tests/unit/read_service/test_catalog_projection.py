"""The catalog projection: every product event, each delivered twice, against a checkpointed in-memory store."""

from __future__ import annotations

import uuid

import pytest

from read_service.keys import CatalogKeys, member_id, product_member
from read_service.projections.base import ALLOWED_COMMANDS, PoisonEvent
from read_service.projections.catalog import CatalogProjection
from tessera.catalog.v1.product_query_service_pb2 import ProductView
from tests.unit.read_service.order_events import Events, MemoryViews, envelope

KEYS = CatalogKeys("unit:")


@pytest.fixture
def views() -> MemoryViews:
    return MemoryViews(CatalogProjection(KEYS))


def product(views: MemoryViews, product_id: str) -> ProductView:
    return ProductView.FromString(views.strings[KEYS.view(product_id)])


def sku_order(views: MemoryViews, include_discontinued: bool) -> list[str]:
    members = sorted(views.zsets.get(KEYS.index(include_discontinued), set()))
    return [product(views, member_id(m)).sku for m in members]


def test_product_added_writes_the_view_and_both_indexes(views: MemoryViews) -> None:
    events = Events()
    product_id, added = events.add_product("Abc-1", "Anvil", 1999, 7)
    views.play([added])

    view = product(views, product_id)
    assert (view.sku, view.name, view.stock_available, view.discontinued) == ("Abc-1", "Anvil", 7, False)
    assert (view.price.currency_code, view.price.amount_minor) == ("EUR", 1999)
    assert view.version == 1
    assert view.created_at == view.updated_at
    member = product_member("Abc-1", product_id)
    assert member.startswith(b"abc-1\x00")
    assert views.zsets[KEYS.index(True)] == {member}
    assert views.zsets[KEYS.index(False)] == {member}
    assert views.duplicates == 1


def test_only_a_products_later_events_read_its_view_first() -> None:
    projection = CatalogProjection(KEYS)
    events = Events()
    product_id, added = events.add_product("New-1", "Nail", 5, 3)
    assert projection.state_keys(envelope(added, 1)) == ()
    assert projection.state_keys(envelope(events.restock(product_id, 1), 2)) == (KEYS.view(product_id),)


def test_price_restock_reserve_release_follow_the_stream(views: MemoryViews) -> None:
    events = Events()
    product_id, added = events.add_product("ABC-1", "Anvil", 1999, 7)
    customer = str(uuid.uuid4())
    order_id, placed = events.place(customer, [(product_id, 3)])
    views.play([added, events.reprice(product_id, 2499)])
    assert product(views, product_id).price.amount_minor == 2499
    assert product(views, product_id).version == 2

    views.play([events.restock(product_id, 5)])
    assert product(views, product_id).stock_available == 12

    views.play([placed])  # an order event: nothing for the catalog
    views.play(events.reserve(order_id))
    assert product(views, product_id).stock_available == 9
    views.play(events.release(order_id))
    view = product(views, product_id)
    assert view.stock_available == 12
    assert view.version == 5
    assert view.updated_at.ToDatetime() > view.created_at.ToDatetime()
    assert views.duplicates == 6


def test_discontinued_leaves_the_active_index_only(views: MemoryViews) -> None:
    events = Events()
    keep, added_keep = events.add_product("b-2", "Bolt", 10, 1)
    gone, added_gone = events.add_product("A-1", "Anvil", 10, 1)
    third, added_third = events.add_product("C-3", "Chisel", 10, 1)
    views.play([added_keep, added_gone, added_third, events.discontinue(gone, "recalled")])

    assert product(views, gone).discontinued is True
    assert product(views, gone).stock_available == 1
    assert sku_order(views, include_discontinued=True) == ["A-1", "b-2", "C-3"]
    assert sku_order(views, include_discontinued=False) == ["b-2", "C-3"]
    # Discontinuing again (a corrupt log) keeps the indexes as they are.
    views.play([events.discontinue(gone)])
    assert sku_order(views, include_discontinued=False) == ["b-2", "C-3"]
    assert keep and third


def test_events_that_do_not_advance_the_version_are_skipped(views: MemoryViews) -> None:
    events = Events()
    product_id, added = events.add_product("A-1", "Anvil", 10, 1)
    views.play([added, events.restock(product_id, 4)])
    stale = envelope(events.restock(product_id, 100), 3)
    stale.aggregate_version = 1
    views.deliver(stale)
    assert views.checkpoint == 3
    assert product(views, product_id).stock_available == 5


def test_a_payload_for_another_product_is_poison(views: MemoryViews) -> None:
    events = Events()
    product_id, added = events.add_product("A-1", "Anvil", 10, 1)
    env = envelope(added, 1)
    env.aggregate_id = str(uuid.uuid4())
    with pytest.raises(PoisonEvent):
        CatalogProjection(KEYS).project(env, {})
    env.aggregate_id = product_id
    env.payload = b"\xff\xff"
    with pytest.raises(PoisonEvent):
        CatalogProjection(KEYS).project(env, {})


def test_only_allowed_commands_are_emitted(views: MemoryViews) -> None:
    events = Events()
    product_id, added = events.add_product("A-1", "Anvil", 10, 1)
    effect = CatalogProjection(KEYS).project(envelope(added, 1), {})
    assert {op[0] for op in effect.ops} <= ALLOWED_COMMANDS
    assert product_id
