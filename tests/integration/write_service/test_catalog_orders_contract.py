"""Products and orders, one contract on two backends: the in-memory fake behaves like Postgres."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from shared_kernel.contracts import errors
from tests.integration.write_service.conftest import Factory
from write_service.domain import catalog, orders, users

pytestmark = pytest.mark.integration

NOW = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
ADDRESS = orders.Address(
    recipient="Ada", line1="1 Main St", line2="Flat 2", city="London", postal_code="N1", country_code="GB"
)


def a_product(sku: str = "Eng-1", price_minor: int = 250) -> catalog.Product:
    return catalog.Product.add(
        product_id=uuid.uuid4(),
        sku=sku,
        name=f"Product {sku}",
        currency_code="EUR",
        price_minor=price_minor,
        initial_stock=5,
        now=NOW,
    )


async def committed_product(new_uow: Factory, product: catalog.Product) -> catalog.Product:
    async with new_uow() as uow:
        await uow.products.add(product)
        await uow.commit()
    return product


async def test_a_product_round_trips_and_is_found_by_sku_in_any_case(new_uow):
    product = await committed_product(new_uow, a_product("Eng-1"))
    async with new_uow() as uow:
        loaded = await uow.products.get(product.id)
        found = await uow.products.by_skus(["eNG-1", "nope"])
        assert await uow.products.sku_taken("ENG-1")
        assert not await uow.products.sku_taken("Eng-2")
    assert loaded is not None
    assert (loaded.sku, loaded.price_minor, loaded.stock_available, loaded.version, loaded.stored_version) == (
        "Eng-1",
        250,
        5,
        1,
        1,
    )
    assert list(found) == ["eng-1"]
    assert found["eng-1"].id == product.id
    assert loaded.pending_events == []


async def test_a_duplicate_sku_is_refused_whatever_its_case(new_uow):
    await committed_product(new_uow, a_product("Eng-1"))
    with pytest.raises(errors.AlreadyExists) as exc_info:
        async with new_uow() as uow:
            await uow.products.add(a_product("ENG-1"))
            await uow.commit()
    assert exc_info.value.field == "sku"


async def test_a_product_save_is_guarded_by_its_version(new_uow):
    product = await committed_product(new_uow, a_product())
    async with new_uow() as uow:
        loaded = await uow.products.get(product.id)
        assert loaded is not None
        loaded.restock(quantity=3, now=NOW)
        await uow.products.save(loaded)
        await uow.commit()
    stale = replace(product, stored_version=1, version=2, stock_available=99)
    with pytest.raises(errors.Conflict):
        async with new_uow() as uow:
            await uow.products.save(stale)
    async with new_uow() as uow:
        again = await uow.products.get(product.id)
    assert again is not None
    assert (again.stock_available, again.version) == (8, 2)


async def test_an_order_round_trips_with_its_lines_and_address(new_uow):
    first = await committed_product(new_uow, a_product("A-1", 250))
    second = await committed_product(new_uow, a_product("B-1", 7))
    user = users.User.register(
        user_id=uuid.uuid4(),
        email="c@example.com",
        username="cust",
        password_hash="$argon2id$x",
        full_name="C",
        now=NOW,
    )
    async with new_uow() as uow:
        await uow.users.add(user)
        customer = await uow.users.get_customer(user.id)
        assert customer is not None
        order = orders.Order.place(
            order_id=uuid.uuid4(),
            customer=customer,
            items=[(first, 2)],
            shipping_address=ADDRESS,
            notes="a\nb",
            now=NOW,
        )
        await uow.orders.add(order)
        await uow.commit()
    async with new_uow() as uow:
        loaded = await uow.orders.get(order.id)
        assert loaded is not None
        loaded.add_item(product=first, quantity=3, now=NOW)
        loaded.add_item(product=second, quantity=1, now=NOW)
        await uow.orders.save(loaded)
        await uow.commit()
    async with new_uow() as uow:
        final = await uow.orders.get(order.id)
        assert await uow.orders.get(uuid.uuid4()) is None
    assert final is not None
    assert (final.status, final.version, final.stored_version, final.total_minor, final.notes) == (
        "pending",
        3,
        3,
        5 * 250 + 7,
        "a\nb",
    )
    assert final.shipping_address == ADDRESS
    assert [(line.line_no, line.sku, line.quantity, line.unit_price_minor) for line in final.lines] == [
        (1, "A-1", 5, 250),
        (2, "B-1", 1, 7),
    ]
    assert (final.customer_id, final.placed_at) == (user.id, NOW)
