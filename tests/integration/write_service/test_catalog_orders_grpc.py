"""Catalog and order commands through the real GrpcServer and servicers, against real Postgres."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from shared_kernel.contracts.consistency import encode_token
from shared_kernel.platform.grpc_errors import bad_request_from_status
from tessera.catalog.v1 import catalog_command_service_pb2 as cat
from tessera.catalog.v1 import catalog_command_service_pb2_grpc as cat_grpc
from tessera.common.v1.money_pb2 import Money
from tessera.orders.v1 import events_pb2, order_pb2
from tessera.orders.v1 import order_command_service_pb2 as ords
from tessera.orders.v1 import order_command_service_pb2_grpc as ords_grpc
from tessera.users.v1 import user_command_service_pb2 as usr
from tessera.users.v1 import user_command_service_pb2_grpc as usr_grpc
from tests.integration.write_service.support import (
    PRINCIPAL_HEADER,
    in_process_write_server,
    running_write_service,
    wait_until_blocked,
)
from tests.unit.write_service import helpers

pytestmark = pytest.mark.integration

TIMEOUT = 10
ADDRESS = order_pb2.Address(**helpers.ADDRESS)


@pytest.fixture
async def channel(db_pool: asyncpg.Pool[Any]) -> AsyncIterator[grpc.aio.Channel]:
    async with in_process_write_server(db_pool) as chan:
        yield chan


@pytest.fixture
def catalog(channel: grpc.aio.Channel) -> cat_grpc.CatalogCommandServiceAsyncStub:
    return cat_grpc.CatalogCommandServiceStub(channel)


@pytest.fixture
def orders(channel: grpc.aio.Channel) -> ords_grpc.OrderCommandServiceAsyncStub:
    return ords_grpc.OrderCommandServiceStub(channel)


@pytest.fixture
def users(channel: grpc.aio.Channel) -> usr_grpc.UserCommandServiceAsyncStub:
    return usr_grpc.UserCommandServiceStub(channel)


def eur(amount: int, code: str = "EUR") -> Money:
    return Money(currency_code=code, amount_minor=amount)


async def add_product(
    catalog, sku: str | None = None, price: Money | None = None, stock: int = 10, name: str = "Engine"
):
    request = cat.AddProductRequest(
        sku=sku or f"SKU-{helpers.suffix()}", name=name, price=price or eur(1999), initial_stock=stock
    )
    return await catalog.AddProduct(request, timeout=TIMEOUT)


async def register(users) -> str:
    token = helpers.suffix()
    reply = await users.RegisterUser(
        usr.RegisterUserRequest(
            email=f"c{token}@example.com", username=f"c{token}", password=helpers.PASSWORD, full_name="Grace Hopper"
        ),
        timeout=TIMEOUT,
    )
    return str(reply.user_id)


def place_request(customer_id: str, *items: tuple[str, int], notes: str = "") -> ords.PlaceOrderRequest:
    return ords.PlaceOrderRequest(
        customer_id=customer_id,
        items=[ords.OrderItem(sku=sku, quantity=quantity) for sku, quantity in items],
        shipping_address=ADDRESS,
        notes=notes,
    )


async def rejected(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as exc_info:
        await call
    return exc_info.value


def fields_of(error: grpc.aio.AioRpcError) -> list[str]:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    bad_request = bad_request_from_status(error)
    assert bad_request is not None
    return [v.field for v in bad_request.field_violations]


def error_info_field(error: grpc.aio.AioRpcError) -> str | None:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return str(info.metadata["field"])
    return None


async def count(pool: asyncpg.Pool[Any], table: str) -> int:
    return int(await pool.fetchval(f"SELECT count(*) FROM {table}"))


# --- catalog --------------------------------------------------------------------------------


async def test_product_lifecycle_commits_state_events_and_tokens(catalog, db_pool):
    added = await add_product(catalog, sku="Eng-Mk1", price=eur(0), stock=0)
    assert added.version == 1
    assert added.consistency_token == encode_token("product", added.product_id, 1)
    repriced = await catalog.UpdateProductPrice(
        cat.UpdateProductPriceRequest(product_id=added.product_id, price=eur(2500), expected_version=1), timeout=TIMEOUT
    )
    restocked = await catalog.RestockProduct(
        cat.RestockProductRequest(product_id=added.product_id, quantity=7), timeout=TIMEOUT
    )
    assert (repriced.version, restocked.version, restocked.stock_available) == (2, 3, 7)
    assert restocked.consistency_token == encode_token("product", added.product_id, 3)
    gone = await catalog.DiscontinueProduct(
        cat.DiscontinueProductRequest(product_id=added.product_id, reason="superseded"), timeout=TIMEOUT
    )
    assert gone.version == 4
    row = await db_pool.fetchrow("SELECT * FROM products WHERE id = $1", uuid.UUID(added.product_id))
    assert (row["sku"], row["price_minor"], row["stock_available"], row["discontinued"], row["version"]) == (
        "Eng-Mk1",
        2500,
        7,
        True,
        4,
    )
    assert row["discontinued_reason"] == "superseded"
    events = await db_pool.fetch(
        "SELECT event_type, aggregate_type, aggregate_version FROM outbox WHERE aggregate_id = $1 ORDER BY id",
        added.product_id,
    )
    assert [(e["event_type"].rsplit(".", 1)[1], e["aggregate_type"], e["aggregate_version"]) for e in events] == [
        ("ProductAdded", "product", 1),
        ("ProductPriceUpdated", "product", 2),
        ("ProductRestocked", "product", 3),
        ("ProductDiscontinued", "product", 4),
    ]


@pytest.mark.parametrize(
    ("request_message", "fields"),
    [
        (cat.AddProductRequest(), ["sku", "name", "price"]),
        (cat.AddProductRequest(sku="a b", name="x", price=eur(1)), ["sku"]),
        (cat.AddProductRequest(sku="S", name="x\x00", price=eur(1)), ["name"]),
        (cat.AddProductRequest(sku="S", name="x", price=eur(1, "EUE")), ["price.currency_code"]),
        (cat.AddProductRequest(sku="S", name="x", price=eur(-1)), ["price.amount_minor"]),
        (cat.AddProductRequest(sku="S", name="x", price=eur(1), initial_stock=-1), ["initial_stock"]),
        (cat.AddProductRequest(sku="S", name="x", price=eur(1), initial_stock=2**40), ["initial_stock"]),
    ],
)
async def test_add_product_bad_fields(catalog, db_pool, request_message, fields):
    error = await rejected(catalog.AddProduct(request_message, timeout=TIMEOUT))
    assert fields_of(error) == fields
    assert await count(db_pool, "products") == 0


async def test_product_command_bad_fields(catalog):
    product_id = (await add_product(catalog)).product_id
    cases = [
        (catalog.UpdateProductPrice(cat.UpdateProductPriceRequest(product_id=product_id)), ["price"]),
        (catalog.UpdateProductPrice(cat.UpdateProductPriceRequest(product_id="x", price=eur(1))), ["product_id"]),
        (catalog.RestockProduct(cat.RestockProductRequest(product_id=product_id, quantity=0)), ["quantity"]),
        (
            catalog.RestockProduct(cat.RestockProductRequest(product_id=product_id, quantity=1, expected_version=0)),
            ["expected_version"],
        ),
        (
            catalog.DiscontinueProduct(cat.DiscontinueProductRequest(product_id=product_id, reason="a\nb")),
            ["reason"],
        ),
    ]
    for call, fields in cases:
        assert fields_of(await rejected(call)) == fields


async def test_product_rules_are_failed_precondition(catalog):
    product_id = (await add_product(catalog, price=eur(100, "JPY"))).product_id
    cases = [
        (
            catalog.UpdateProductPrice(cat.UpdateProductPriceRequest(product_id=product_id, price=eur(1, "USD"))),
            "a price change must keep the product's currency",
        ),
        (
            catalog.RestockProduct(cat.RestockProductRequest(product_id=product_id, quantity=1, expected_version=9)),
            "is at version 1, not the expected version 9",
        ),
    ]
    for call, message in cases:
        error = await rejected(call)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert message in (error.details() or "")
    await catalog.DiscontinueProduct(cat.DiscontinueProductRequest(product_id=product_id), timeout=TIMEOUT)
    cases = [
        (
            catalog.RestockProduct(cat.RestockProductRequest(product_id=product_id, quantity=1)),
            "a discontinued product cannot be restocked",
        ),
        (
            catalog.UpdateProductPrice(cat.UpdateProductPriceRequest(product_id=product_id, price=eur(5, "JPY"))),
            "a discontinued product cannot be repriced",
        ),
        (
            catalog.DiscontinueProduct(cat.DiscontinueProductRequest(product_id=product_id)),
            "is already discontinued",
        ),
    ]
    for call, message in cases:
        error = await rejected(call)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert message in (error.details() or "")
    missing = await rejected(
        catalog.RestockProduct(cat.RestockProductRequest(product_id=str(uuid.uuid4()), quantity=1))
    )
    assert missing.code() == grpc.StatusCode.NOT_FOUND


async def test_a_duplicate_sku_is_already_exists_naming_sku(catalog, db_pool):
    await add_product(catalog, sku="Dup-1")
    error = await rejected(add_product(catalog, sku="dUP-1"))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info_field(error) == "sku"
    assert await count(db_pool, "products") == 1


async def test_a_sku_racing_an_uncommitted_twin_is_already_exists(catalog, db_pool):
    """The check before the insert cannot see an uncommitted twin; the unique index decides."""
    async with db_pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await conn.execute(
            "INSERT INTO products (id, sku, name, currency_code, price_minor, stock_available, version, "
            "created_at, updated_at) VALUES ($1, 'RACE-1', 'twin', 'EUR', 1, 1, 1, now(), now())",
            uuid.uuid4(),
        )
        call = asyncio.ensure_future(add_product(catalog, sku="race-1"))
        await wait_until_blocked(db_pool)
        await tx.commit()
    error = await rejected(call)
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_info_field(error) == "sku"
    assert await count(db_pool, "products") == 1


async def test_concurrent_adds_of_one_sku_create_exactly_one_product(catalog, db_pool):
    results = await asyncio.gather(
        *(add_product(catalog, sku=f"{'hot' if n % 2 else 'HOT'}-sku") for n in range(8)), return_exceptions=True
    )
    ok = [r for r in results if isinstance(r, cat.AddProductResponse)]
    errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) == 1
    assert {e.code() for e in errors} == {grpc.StatusCode.ALREADY_EXISTS}
    assert {error_info_field(e) for e in errors} == {"sku"}
    assert await count(db_pool, "products") == 1
    assert await count(db_pool, "outbox WHERE aggregate_type = 'product'") == 1


# --- orders ---------------------------------------------------------------------------------


async def test_place_order_writes_order_lines_event_log_and_saga_in_one_go(catalog, orders, users, db_pool):
    customer_id = await register(users)
    engine = await add_product(catalog, sku="Engine-1", price=eur(1999), name="Difference Engine")
    await add_product(catalog, sku="Card-1", price=eur(5), name="Punched card", stock=3)
    reply = await orders.PlaceOrder(
        place_request(customer_id, ("engine-1", 3), ("CARD-1", 7), notes="ring twice\n\tthanks"), timeout=TIMEOUT
    )
    assert reply.version == 1
    assert reply.consistency_token == encode_token("order", reply.order_id, 1)
    assert [(line.sku, line.product_name, line.unit_price.amount_minor, line.quantity) for line in reply.lines] == [
        ("Engine-1", "Difference Engine", 1999, 3),
        ("Card-1", "Punched card", 5, 7),
    ]
    assert [line.line_total.amount_minor for line in reply.lines] == [5997, 35]
    assert reply.lines[0].product_id == engine.product_id
    order_id = uuid.UUID(reply.order_id)
    order = await db_pool.fetchrow("SELECT * FROM orders WHERE id = $1", order_id)
    assert (order["status"], order["currency_code"], order["total_minor"], order["version"]) == (
        "pending",
        "EUR",
        6032,
        1,
    )
    assert json.loads(order["shipping_address"]) == helpers.ADDRESS
    assert order["notes"] == "ring twice\n\tthanks"
    lines = await db_pool.fetch("SELECT * FROM order_lines WHERE order_id = $1 ORDER BY line_no", order_id)
    assert [(r["line_no"], r["sku"], r["unit_price_minor"], r["quantity"]) for r in lines] == [
        (1, "Engine-1", 1999, 3),
        (2, "Card-1", 5, 7),
    ]
    [event] = await db_pool.fetch("SELECT * FROM outbox WHERE aggregate_type = 'order'")
    assert (event["event_type"], event["aggregate_id"], event["aggregate_version"]) == (
        "tessera.orders.v1.OrderPlaced",
        reply.order_id,
        1,
    )
    [saga] = await db_pool.fetch("SELECT * FROM saga_executions")
    assert (saga["order_id"], saga["saga_type"], saga["status"], saga["current_step"]) == (
        order_id,
        "place_order",
        "running",
        "reserve_stock",
    )
    assert (saga["version"], saga["attempts"], saga["last_error"], json.loads(saga["context"])) == (1, 0, "", {})
    assert saga["next_attempt_at"] == saga["created_at"] == saga["updated_at"] == order["placed_at"]
    log = await db_pool.fetchrow("SELECT * FROM command_log WHERE command_type = 'PlaceOrder'")
    assert (log["outcome"], log["aggregate_type"], log["aggregate_id"]) == ("succeeded", "order", reply.order_id)
    # Stock is the saga's business: placing reserves nothing.
    assert {r["stock_available"] for r in await db_pool.fetch("SELECT stock_available FROM products")} == {10, 3}


async def test_orders_are_priced_from_the_catalog_at_placing_time(catalog, orders, users, db_pool):
    customer_id = await register(users)
    product = await add_product(catalog, sku="P-1", price=eur(1000))
    first = await orders.PlaceOrder(place_request(customer_id, ("P-1", 2)), timeout=TIMEOUT)
    await catalog.UpdateProductPrice(
        cat.UpdateProductPriceRequest(product_id=product.product_id, price=eur(1250)), timeout=TIMEOUT
    )
    second = await orders.PlaceOrder(place_request(customer_id, ("P-1", 2)), timeout=TIMEOUT)
    assert [line.unit_price.amount_minor for line in first.lines] == [1000]
    assert [line.unit_price.amount_minor for line in second.lines] == [1250]
    totals = {str(r["id"]): r["total_minor"] for r in await db_pool.fetch("SELECT id, total_minor FROM orders")}
    assert totals == {first.order_id: 2000, second.order_id: 2500}


async def test_place_order_rules_are_failed_precondition_and_write_nothing(catalog, orders, users, db_pool):
    customer_id = await register(users)
    inactive = await register(users)
    await users.DeactivateUser(usr.DeactivateUserRequest(user_id=inactive, reason="gone"), timeout=TIMEOUT)
    await add_product(catalog, sku="EUR-1")
    await add_product(catalog, sku="USD-1", price=eur(10, "USD"))
    gone = await add_product(catalog, sku="OLD-1")
    await catalog.DiscontinueProduct(cat.DiscontinueProductRequest(product_id=gone.product_id), timeout=TIMEOUT)
    unknown_customer = str(uuid.uuid4())
    cases = [
        (place_request(inactive, ("EUR-1", 1)), f"customer {inactive} must be an active user"),
        (place_request(unknown_customer, ("EUR-1", 1)), f"customer {unknown_customer} must be an active user"),
        (place_request(customer_id, ("EUR-1", 1), ("NOPE-9", 1)), "unknown sku: 'NOPE-9'"),
        (place_request(customer_id, ("old-1", 1)), "product 'OLD-1' is discontinued"),
        (place_request(customer_id, ("EUR-1", 1), ("USD-1", 1)), "all items of an order must share one currency"),
    ]
    for request, message in cases:
        error = await rejected(orders.PlaceOrder(request, timeout=TIMEOUT))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert message in (error.details() or "")
    assert await count(db_pool, "orders") == 0
    assert await count(db_pool, "saga_executions") == 0
    assert await count(db_pool, "outbox WHERE aggregate_type = 'order'") == 0


async def test_place_order_bad_fields_use_proto_paths(orders, db_pool):
    request = ords.PlaceOrderRequest(
        customer_id="nope",
        items=[ords.OrderItem(sku="A-1", quantity=0), ords.OrderItem(sku="a-1", quantity=1)],
        shipping_address=order_pb2.Address(recipient="R", line1="L", city="", postal_code="1", country_code="de"),
        notes="x" * 1001,
    )
    error = await rejected(orders.PlaceOrder(request, timeout=TIMEOUT))
    assert sorted(fields_of(error)) == [
        "customer_id",
        "items[0].quantity",
        "items[1].sku",
        "notes",
        "shipping_address.city",
        "shipping_address.country_code",
    ]
    no_items = await rejected(orders.PlaceOrder(ords.PlaceOrderRequest(customer_id=str(uuid.uuid4())), timeout=TIMEOUT))
    assert fields_of(no_items) == ["items", "shipping_address"]
    assert await count(db_pool, "command_log") == 0


async def test_a_retried_place_order_returns_the_first_reply_and_places_once(catalog, orders, users, db_pool):
    customer_id = await register(users)
    await add_product(catalog, sku="K-1")
    request = place_request(customer_id, ("K-1", 2))
    key = (("idempotency-key", helpers.key()),)
    first = await orders.PlaceOrder(request, metadata=key, timeout=TIMEOUT)
    again = await orders.PlaceOrder(request, metadata=key, timeout=TIMEOUT)
    assert again.SerializeToString(deterministic=True) == first.SerializeToString(deterministic=True)
    assert len(again.lines) == 1
    assert await count(db_pool, "orders") == 1
    assert await count(db_pool, "saga_executions") == 1
    assert await count(db_pool, "outbox WHERE aggregate_type = 'order'") == 1
    outcomes = [
        r["outcome"]
        for r in await db_pool.fetch(
            "SELECT outcome FROM command_log WHERE command_type = 'PlaceOrder' ORDER BY received_at"
        )
    ]
    assert outcomes == ["succeeded", "replayed"]
    other = await rejected(orders.PlaceOrder(place_request(customer_id, ("K-1", 3)), metadata=key, timeout=TIMEOUT))
    assert fields_of(other) == ["idempotency-key"]


async def placed_order(catalog, orders, users, *items: tuple[str, int]) -> ords.PlaceOrderResponse:
    customer_id = await register(users)
    for sku, _ in items:
        await add_product(catalog, sku=sku, price=eur(100))
    reply: ords.PlaceOrderResponse = await orders.PlaceOrder(place_request(customer_id, *items), timeout=TIMEOUT)
    return reply


async def test_add_order_item_grows_a_line_or_adds_one(catalog, orders, users, db_pool):
    order = await placed_order(catalog, orders, users, ("A-1", 1))
    await add_product(catalog, sku="B-1", price=eur(7))
    grown = await orders.AddOrderItem(
        ords.AddOrderItemRequest(
            order_id=order.order_id, item=ords.OrderItem(sku="a-1", quantity=4), expected_version=1
        ),
        timeout=TIMEOUT,
    )
    added = await orders.AddOrderItem(
        ords.AddOrderItemRequest(order_id=order.order_id, item=ords.OrderItem(sku="B-1", quantity=2)), timeout=TIMEOUT
    )
    assert (grown.version, added.version) == (2, 3)
    assert added.consistency_token == encode_token("order", order.order_id, 3)
    order_id = uuid.UUID(order.order_id)
    lines = await db_pool.fetch(
        "SELECT sku, quantity, unit_price_minor FROM order_lines WHERE order_id = $1 ORDER BY line_no", order_id
    )
    assert [tuple(r) for r in lines] == [("A-1", 5, 100), ("B-1", 2, 7)]
    assert await db_pool.fetchval("SELECT total_minor FROM orders WHERE id = $1", order_id) == 514
    types = [
        r["event_type"]
        for r in await db_pool.fetch(
            "SELECT event_type FROM outbox WHERE aggregate_id = $1 ORDER BY id", order.order_id
        )
    ]
    assert types == [
        "tessera.orders.v1.OrderPlaced",
        "tessera.orders.v1.OrderItemAdded",
        "tessera.orders.v1.OrderItemAdded",
    ]
    over = await rejected(
        orders.AddOrderItem(
            ords.AddOrderItemRequest(order_id=order.order_id, item=ords.OrderItem(sku="A-1", quantity=9996))
        )
    )
    assert over.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "at most 10000 units" in (over.details() or "")
    bad = await rejected(orders.AddOrderItem(ords.AddOrderItemRequest(order_id=order.order_id)))
    assert fields_of(bad) == ["item"]
    missing = await rejected(
        orders.AddOrderItem(
            ords.AddOrderItemRequest(order_id=str(uuid.uuid4()), item=ords.OrderItem(sku="A-1", quantity=1))
        )
    )
    assert missing.code() == grpc.StatusCode.NOT_FOUND


async def test_add_order_item_waits_for_the_saga_lock_then_sees_the_new_status(catalog, orders, users, db_pool):
    order = await placed_order(catalog, orders, users, ("A-1", 1))
    order_id = uuid.UUID(order.order_id)
    async with db_pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        # What the saga's reserve step does: lock the order row first, then move it on.
        await conn.execute("SELECT 1 FROM orders WHERE id = $1 FOR UPDATE", order_id)
        call = asyncio.ensure_future(
            orders.AddOrderItem(
                ords.AddOrderItemRequest(order_id=order.order_id, item=ords.OrderItem(sku="A-1", quantity=1)),
                timeout=TIMEOUT,
            )
        )
        await wait_until_blocked(db_pool)
        await conn.execute("UPDATE orders SET status = 'reserved', version = version + 1 WHERE id = $1", order_id)
        await tx.commit()
    error = await rejected(call)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "items can only be added while the order is pending" in (error.details() or "")
    assert await db_pool.fetchval("SELECT quantity FROM order_lines WHERE order_id = $1", order_id) == 1


async def test_concurrent_item_additions_to_one_order_all_apply(catalog, orders, users, db_pool):
    order = await placed_order(catalog, orders, users, ("A-1", 1))
    request = ords.AddOrderItemRequest(order_id=order.order_id, item=ords.OrderItem(sku="A-1", quantity=1))
    replies = await asyncio.gather(*(orders.AddOrderItem(request, timeout=TIMEOUT) for _ in range(10)))
    assert sorted(r.version for r in replies) == list(range(2, 12))
    order_id = uuid.UUID(order.order_id)
    assert await db_pool.fetchval("SELECT quantity FROM order_lines WHERE order_id = $1", order_id) == 11
    assert await db_pool.fetchval("SELECT total_minor FROM orders WHERE id = $1", order_id) == 1100


async def test_place_order_waits_for_a_product_being_changed_and_sees_the_change(catalog, orders, users, db_pool):
    customer_id = await register(users)
    product = await add_product(catalog, sku="SLOW-1")
    async with db_pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        # What a DiscontinueProduct in flight holds: the product row, locked for update.
        await conn.execute("SELECT 1 FROM products WHERE id = $1 FOR UPDATE", uuid.UUID(product.product_id))
        call = asyncio.ensure_future(orders.PlaceOrder(place_request(customer_id, ("SLOW-1", 1)), timeout=TIMEOUT))
        await wait_until_blocked(db_pool)
        await conn.execute("UPDATE products SET discontinued = true WHERE id = $1", uuid.UUID(product.product_id))
        await tx.commit()
    error = await rejected(call)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'SLOW-1' is discontinued" in (error.details() or "")
    assert await count(db_pool, "orders") == 0


@pytest.mark.parametrize(
    ("order_status", "saga_status"),
    [("pending", "running"), ("reserved", "running"), ("confirmed", "completed"), ("confirmed", "failed")],
)
async def test_cancel_hands_the_compensation_to_the_saga(catalog, orders, users, db_pool, order_status, saga_status):
    order = await placed_order(catalog, orders, users, ("A-1", 1))
    order_id = uuid.UUID(order.order_id)
    await db_pool.execute("UPDATE orders SET status = $2 WHERE id = $1", order_id, order_status)
    await db_pool.execute(
        "UPDATE saga_executions SET status = $2, current_step = 'capture_payment', attempts = 3, last_error = 'boom', "
        "next_attempt_at = NULL, version = 5 WHERE order_id = $1",
        order_id,
        saga_status,
    )
    reply = await orders.CancelOrder(
        ords.CancelOrderRequest(order_id=order.order_id, reason="changed my mind"),
        metadata=((PRINCIPAL_HEADER, "svc-frontdesk"),),
        timeout=TIMEOUT,
    )
    assert reply.version == 2
    row = await db_pool.fetchrow("SELECT * FROM orders WHERE id = $1", order_id)
    assert (row["status"], row["reason"], row["cancelled_by"], row["version"]) == (
        "cancelled",
        "changed my mind",
        "svc-frontdesk",
        2,
    )
    saga = await db_pool.fetchrow("SELECT * FROM saga_executions WHERE order_id = $1", order_id)
    assert (saga["status"], saga["current_step"], saga["attempts"], saga["last_error"], saga["version"]) == (
        "compensating",
        "compensate",
        0,
        "",
        6,
    )
    assert saga["next_attempt_at"] == saga["updated_at"] == row["updated_at"]
    [step] = await db_pool.fetch("SELECT * FROM saga_steps WHERE saga_id = $1", saga["id"])
    assert (step["step"], step["kind"], step["outcome"], step["detail"], step["attempt"]) == (
        "cancel_requested",
        "compensate",
        "succeeded",
        "changed my mind",
        1,
    )
    event = await db_pool.fetchrow(
        "SELECT * FROM outbox WHERE aggregate_id = $1 AND aggregate_version = 2", order.order_id
    )
    assert event["event_type"] == "tessera.orders.v1.OrderCancelled"
    cancelled = events_pb2.OrderCancelled.FromString(event["payload"])
    assert cancelled.previous_status == order_pb2.OrderStatus.Value(f"ORDER_STATUS_{order_status.upper()}")
    assert cancelled.cancelled_by == "svc-frontdesk"
    # Stock and payments are the saga's to undo.
    assert await count(db_pool, "stock_reservations") == 0


@pytest.mark.parametrize(
    ("status", "message"),
    [
        ("shipped", "a shipped order cannot be cancelled"),
        ("cancelled", "is already cancelled"),
        ("rejected", "is already rejected"),
    ],
)
async def test_final_orders_cannot_be_cancelled(catalog, orders, users, db_pool, status, message):
    order = await placed_order(catalog, orders, users, ("A-1", 1))
    await db_pool.execute("UPDATE orders SET status = $2 WHERE id = $1", uuid.UUID(order.order_id), status)
    error = await rejected(orders.CancelOrder(ords.CancelOrderRequest(order_id=order.order_id, reason="late")))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert message in (error.details() or "")
    assert await db_pool.fetchval("SELECT status FROM saga_executions") == "running"
    assert await count(db_pool, "saga_steps") == 0


async def test_cancel_and_ship_bad_fields(orders):
    order_id = str(uuid.uuid4())
    cases = [
        (orders.CancelOrder(ords.CancelOrderRequest(order_id=order_id)), ["reason"]),
        (orders.CancelOrder(ords.CancelOrderRequest(order_id=order_id, reason="r\x07")), ["reason"]),
        (orders.CancelOrder(ords.CancelOrderRequest(order_id="", reason="r")), ["order_id"]),
        (orders.ShipOrder(ords.ShipOrderRequest(order_id=order_id, tracking_number="T1")), ["carrier"]),
        (
            orders.ShipOrder(ords.ShipOrderRequest(order_id=order_id, carrier="DHL", tracking_number="T_1")),
            ["tracking_number"],
        ),
        (
            orders.ShipOrder(ords.ShipOrderRequest(order_id=order_id, carrier="DHL", tracking_number="T" * 101)),
            ["tracking_number"],
        ),
    ]
    for call, fields in cases:
        assert fields_of(await rejected(call)) == fields


async def test_only_a_confirmed_order_ships(catalog, orders, users, db_pool):
    order = await placed_order(catalog, orders, users, ("A-1", 1))
    ship = ords.ShipOrderRequest(order_id=order.order_id, carrier="Royal Mail", tracking_number="RM 1234-56")
    error = await rejected(orders.ShipOrder(ship, timeout=TIMEOUT))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "only a confirmed order can be shipped" in (error.details() or "")
    # What the saga does once the payment is captured.
    await db_pool.execute("UPDATE orders SET status = 'confirmed' WHERE id = $1", uuid.UUID(order.order_id))
    reply = await orders.ShipOrder(ship, timeout=TIMEOUT)
    assert reply.version == 2
    row = await db_pool.fetchrow(
        "SELECT status, carrier, tracking_number FROM orders WHERE id = $1", uuid.UUID(order.order_id)
    )
    assert tuple(row) == ("shipped", "Royal Mail", "RM 1234-56")
    again = await rejected(orders.ShipOrder(ship, timeout=TIMEOUT))
    assert again.code() == grpc.StatusCode.FAILED_PRECONDITION


# --- the real process -----------------------------------------------------------------------


async def test_the_write_service_process_serves_catalog_and_orders(database_url):
    names = [
        "tessera.users.v1.UserCommandService",
        "tessera.catalog.v1.CatalogCommandService",
        "tessera.orders.v1.OrderCommandService",
    ]
    async with running_write_service(database_url) as service:
        health = health_pb2_grpc.HealthStub(service.channel)
        for name in names:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
        reflection = reflection_pb2_grpc.ServerReflectionStub(service.channel)
        responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        listed = {s.name async for r in responses for s in r.list_services_response.service}
        assert set(names) <= listed
        catalog = cat_grpc.CatalogCommandServiceStub(service.channel)
        orders = ords_grpc.OrderCommandServiceStub(service.channel)
        users = usr_grpc.UserCommandServiceStub(service.channel)
        await add_product(catalog, sku="PROC-1", price=eur(42))
        placed = await orders.PlaceOrder(place_request(await register(users), ("proc-1", 2)), timeout=TIMEOUT)
        assert [line.line_total.amount_minor for line in placed.lines] == [84]
        cancelled = await orders.CancelOrder(
            ords.CancelOrderRequest(order_id=placed.order_id, reason="test"), timeout=TIMEOUT
        )
        assert cancelled.version == 2
        code, _ = await service.terminate()
        assert code == 0
