"""Property-based checks of the catalog and order servicers over the in-memory unit of work.

Whatever fields a caller sends, a command either succeeds and keeps the invariants (exact
totals, prices from the catalog, quantities in range) or fails with one of the errors that
name a caller's mistake or a broken rule; nothing else escapes, and a refused command
changes nothing.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared_kernel.contracts.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from tessera.catalog.v1 import catalog_command_service_pb2 as cat
from tessera.common.v1.money_pb2 import Money
from tessera.orders.v1 import order_command_service_pb2 as ords
from tessera.orders.v1 import order_pb2
from tests.unit.write_service import helpers
from tests.unit.write_service.test_grpc_mapping import FakeContext
from write_service.adapters.memory import InMemoryDatabase, InMemoryUnitOfWork
from write_service.entrypoints.catalog import CatalogCommandServicer
from write_service.entrypoints.orders import OrderCommandServicer
from write_service.service_layer.command_steps import Dependencies
from write_service.service_layer.messagebus import CommandBus

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
SMALL_OR_WILD = st.one_of(st.integers(min_value=-2, max_value=12_000), INT64)
# Mostly skus of the catalog below, in any case, plus arbitrary text.
SKUS = st.one_of(st.sampled_from(["A-1", "a-1", "B-2", "USD-1", "OLD-1", "nope"]), st.text(max_size=70))
TEXT = st.one_of(st.text(max_size=30), st.sampled_from(["", " ", "x\r\ny", "ok", "DE", "de", "n" * 201]))
EXPECTED = (InvalidArgument, FailedPrecondition, NotFound)
GOOD_ADDRESS = ("Ada", "1 Main St", "", "London", "N1 9GU", "GB")
# Mostly well-formed input, so that many examples get past validation to the rules and the totals.
GOOD_ITEM = st.tuples(
    st.sampled_from(["A-1", "b-2", "a-1", "OLD-1", "USD-1"]), st.integers(min_value=1, max_value=10_000)
)
ITEMS = st.one_of(
    st.lists(GOOD_ITEM, min_size=1, max_size=4, unique_by=lambda item: item[0].lower()),
    st.lists(GOOD_ITEM, min_size=1, max_size=4, unique_by=lambda item: item[0].lower()),
    st.lists(st.one_of(GOOD_ITEM, st.tuples(SKUS, SMALL_OR_WILD)), max_size=6),
)
NOTES = st.one_of(st.just(""), st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=40), TEXT)


class World:
    """A catalog (two EUR products, one USD, one discontinued), an active customer, and the servicers."""

    def __init__(self) -> None:
        self.db = InMemoryDatabase()
        bus = CommandBus(lambda d: InMemoryUnitOfWork(self.db, d), Dependencies(hasher=helpers.cheap_hasher()))
        self.catalog = CatalogCommandServicer(bus, max_command_s=5.0)
        self.orders = OrderCommandServicer(bus, max_command_s=5.0)
        self.bus = bus
        self.customer_id = ""
        self.prices: dict[str, int] = {}
        self.currencies: dict[str, str] = {}

    async def setup(self) -> None:
        self.customer_id = str((await self.bus.dispatch(helpers.register(), helpers.meta())).aggregate_id)
        for sku, code, price in [("A-1", "EUR", 1999), ("B-2", "EUR", 5), ("USD-1", "USD", 7), ("OLD-1", "EUR", 1)]:
            reply = await self.catalog.AddProduct(
                cat.AddProductRequest(
                    sku=sku, name=f"P {sku}", price=Money(currency_code=code, amount_minor=price), initial_stock=3
                ),
                call(),
            )
            self.prices[sku.lower()] = price
            self.currencies[sku.lower()] = code
            if sku == "OLD-1":
                await self.catalog.DiscontinueProduct(
                    cat.DiscontinueProductRequest(product_id=reply.product_id), call()
                )


def call() -> Any:
    """A servicer context with no headers and no deadline."""
    return FakeContext()


def world() -> World:
    w = World()
    asyncio.run(w.setup())
    return w


def snapshot(w: World) -> tuple[int, int, int]:
    return len(w.db.outbox), len(w.db.orders), len(w.db.sagas)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    customer=st.sampled_from(["real", "real", "real", "unknown", "bad"]),
    items=ITEMS,
    address=st.one_of(st.just(GOOD_ADDRESS), st.just(GOOD_ADDRESS), st.none(), st.tuples(*[TEXT] * 6)),
    notes=NOTES,
)
def test_place_order_succeeds_exactly_or_fails_cleanly(
    customer: str, items: Sequence[tuple[str, int]], address: tuple[str, ...] | None, notes: str
) -> None:
    w = world()
    customer_id = {"real": w.customer_id, "unknown": str(uuid.uuid4()), "bad": "not-a-uuid"}[customer]
    request = ords.PlaceOrderRequest(
        customer_id=customer_id,
        items=[ords.OrderItem(sku=sku, quantity=quantity) for sku, quantity in items],
        notes=notes,
    )
    if address is not None:
        request.shipping_address.CopyFrom(
            order_pb2.Address(
                recipient=address[0],
                line1=address[1],
                line2=address[2],
                city=address[3],
                postal_code=address[4],
                country_code=address[5],
            )
        )
    before = snapshot(w)
    try:
        reply = asyncio.run(w.orders.PlaceOrder(request, call()))
    except EXPECTED:
        assert snapshot(w) == before
        return
    order = w.db.orders[uuid.UUID(reply.order_id)]
    assert 1 <= len(order.lines) <= 100
    assert all(1 <= line.quantity <= 10_000 for line in order.lines)
    assert order.total_minor == sum(w.prices[line.sku.lower()] * line.quantity for line in order.lines)
    assert [line.line_total.amount_minor for line in reply.lines] == [
        line.unit_price_minor * line.quantity for line in order.lines
    ]
    assert len({line.sku for line in order.lines}) == len(order.lines)
    assert {w.currencies[line.sku.lower()] for line in order.lines} == {order.currency_code}
    assert "old-1" not in {line.sku.lower() for line in order.lines}
    assert snapshot(w) == (before[0] + 1, before[1] + 1, before[2] + 1)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sku=SKUS, name=TEXT, code=st.sampled_from(["EUR", "eur", "XXX", "", "JPY"]), amount=INT64, stock=INT64)
def test_add_product_succeeds_or_fails_cleanly(sku: str, name: str, code: str, amount: int, stock: int) -> None:
    w = world()
    request = cat.AddProductRequest(
        sku=sku, name=name, price=Money(currency_code=code, amount_minor=amount), initial_stock=stock
    )
    before = len(w.db.products)
    try:
        reply = asyncio.run(w.catalog.AddProduct(request, call()))
    except (*EXPECTED, AlreadyExists):
        assert len(w.db.products) == before
        return
    product = w.db.products[uuid.UUID(reply.product_id)]
    assert sku.lower() not in w.prices
    assert 0 <= product.price_minor <= 10**12
    assert 0 <= product.stock_available <= 10**9
    assert product.currency_code in {"EUR", "JPY"}
