"""The client against the real stack: typed replies and errors, read-your-writes, the sync API."""

from __future__ import annotations

import asyncio

import pytest

from devstack.supervisor import Stack
from tessera.common.v1.money_pb2 import Money
from tessera_client import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    SyncTesseraClient,
    TesseraClient,
)

pytestmark = pytest.mark.e2e


async def register(client: TesseraClient, unique: str, suffix: str = "") -> str:
    reply = await client.users.register_user(
        email=f"c{unique}{suffix}@example.com",
        username=f"c{unique}{suffix}",
        password="correct horse battery",
        full_name="Client Test",
    )
    return reply.user_id


async def test_command_then_query_reads_the_write(client: TesseraClient, unique: str) -> None:
    user_id = await register(client, unique)
    for n in range(3):
        await client.users.update_user_profile(user_id=user_id, full_name=f"Name {n}", bio="", avatar_url="")
    # Every read carries the session's token: it reflects the last update on whichever replica.
    for _ in range(6):
        reply = await client.users.get_user(user_id=user_id)
        assert reply.user.full_name == "Name 2"
        assert reply.user.version == 4
        assert not reply.stale


async def test_errors_are_typed_with_field_violations(client: TesseraClient, unique: str) -> None:
    with pytest.raises(InvalidArgument) as invalid:
        await client.users.register_user(email="not-an-email", username=f"x{unique}", password="p" * 12, full_name="X")
    assert invalid.value.violation("email") is not None
    await register(client, unique, "dup")
    with pytest.raises(AlreadyExists) as duplicate:
        await register(client, unique, "dup")
    assert duplicate.value.error_info is not None
    with pytest.raises(NotFound):
        await client.users.get_user(user_id="00000000-0000-4000-8000-000000000000")


async def test_catalog_and_orders(client: TesseraClient, unique: str) -> None:
    customer = await register(client, unique, "buyer")
    sku = f"CL-{unique}".upper()
    product = await client.catalog.add_product(
        sku=sku, name="Client widget", price=Money(currency_code="EUR", amount_minor=500), initial_stock=10
    )
    await client.catalog.restock_product(product_id=product.product_id, quantity=5)
    assert (await client.catalog.get_product(product_id=product.product_id)).product.stock_available == 15
    placed = await client.orders.place_order(
        customer_id=customer,
        items=[{"sku": sku, "quantity": 2}],
        shipping_address={
            "recipient": "Client Test",
            "line1": "1 Main St",
            "city": "Springfield",
            "postal_code": "12345",
            "country_code": "US",
        },
    )
    order = (await client.orders.get_order(order_id=placed.order_id)).order
    assert order.order_id == placed.order_id
    assert order.version >= placed.version
    page = await client.orders.list_orders_by_customer(customer_id=customer)
    assert placed.order_id in [o.order_id for o in page.orders]


def test_sync_client(stack: Stack, unique: str) -> None:
    with SyncTesseraClient(stack.write_address, stack.read_addresses, timeout=15.0) as tessera:
        reply = tessera.users.register_user(
            email=f"s{unique}@example.com", username=f"s{unique}", password="correct horse battery", full_name="Sync"
        )
        assert tessera.users.get_user(user_id=reply.user_id).user.username == f"s{unique}"
        with pytest.raises(NotFound):
            tessera.users.get_user(user_id="00000000-0000-4000-8000-000000000000")


async def test_a_killed_replica_is_skipped(client: TesseraClient, stack: Stack, unique: str) -> None:
    user_id = await register(client, unique, "rr")
    await client.users.get_user(user_id=user_id)
    victim = stack.readers[0]
    await asyncio.to_thread(victim.kill)
    try:
        for _ in range(10):
            assert (await client.users.get_user(user_id=user_id)).user.user_id == user_id
    finally:
        await asyncio.to_thread(victim.start)
        await victim.wait_healthy_async(60.0)


def test_sync_watch_is_a_plain_iterator(stack: Stack, unique: str) -> None:
    with SyncTesseraClient(stack.write_address, stack.read_addresses, timeout=15.0) as tessera:
        reply = tessera.users.register_user(
            email=f"sw{unique}@example.com", username=f"sw{unique}", password="correct horse battery", full_name="W1"
        )
        tessera.users.get_user(user_id=reply.user_id)
        watch = tessera.users.watch_user(user_id=reply.user_id)
        first = next(watch)
        if not first.exists:  # this replica had not applied the registration yet
            first = next(watch)
        assert first.exists and first.version == 1
        tessera.users.update_user_profile(user_id=reply.user_id, full_name="W2", bio="", avatar_url="")
        assert next(watch).user.full_name == "W2"
        watch.close()


async def test_a_commands_only_client_refuses_queries(stack: Stack) -> None:
    async with TesseraClient(stack.write_address, None) as writer:
        with pytest.raises(ValueError, match="without read replicas"):
            await writer.users.get_user(user_id="00000000-0000-4000-8000-000000000000")
