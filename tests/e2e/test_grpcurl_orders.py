"""The catalog, order, saga and provider calls of docs/grpcurl.md, made with the real grpcurl binary."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from devstack.supervisor import Stack
from tests.e2e.grpcurl import grpcurl

pytestmark = pytest.mark.e2e

CATALOG = "tessera.catalog.v1.CatalogCommandService"
ORDERS = "tessera.orders.v1.OrderCommandService"
PRODUCTS = "tessera.catalog.v1.ProductQueryService"
ORDER_QUERIES = "tessera.orders.v1.OrderQueryService"
SAGAS = "tessera.orders.v1.OrderSagaAdminService"
PROVIDER = "tessera.payments.v1.PaymentProviderService"


def call(address: str, method: str, body: dict[str, Any], *headers: str) -> dict[str, Any]:
    """One grpcurl call that must succeed; its JSON reply."""
    args: list[str] = []
    for header in headers:
        args += ["-H", header]
    done = grpcurl(*args, "-d", json.dumps(body), address, method)
    assert done.returncode == 0, f"{method}: {done.stderr}"
    reply: dict[str, Any] = json.loads(done.stdout)
    return reply


async def eventually(
    address: str, method: str, body: dict[str, Any], until: str, within: float = 20.0
) -> dict[str, Any]:
    """Repeat a query until its reply's JSON text contains `until` (the saga runs after the reply)."""
    deadline = time.monotonic() + within
    last: subprocess.CompletedProcess[str] | None = None
    while time.monotonic() < deadline:
        last = await asyncio.to_thread(grpcurl, "-d", json.dumps(body), address, method)
        if last.returncode == 0 and until in last.stdout:
            reply: dict[str, Any] = json.loads(last.stdout)
            return reply
        await asyncio.sleep(0.1)
    raise AssertionError(
        f"{method} never showed {until!r}: {last.stdout if last else ''} {last.stderr if last else ''}"
    )


async def test_readme_order_flow_through_grpcurl(stack: Stack, unique: str) -> None:
    write = stack.write_address
    replica_1, replica_2 = stack.read_addresses[:2]
    sku = f"MUG-{unique}"

    user = call(
        write,
        "tessera.users.v1.UserCommandService/RegisterUser",
        {
            "email": f"ada.{unique}@example.com",
            "username": f"ada_{unique}",
            "password": "correct horse battery",
            "full_name": "Ada Lovelace",
        },
    )
    added = call(
        write,
        f"{CATALOG}/AddProduct",
        {
            "sku": sku,
            "name": "Blue mug",
            "price": {"currency_code": "EUR", "amount_minor": "1250"},
            "initial_stock": "10",
        },
    )
    product_id = added["product_id"]
    restocked = call(write, f"{CATALOG}/RestockProduct", {"product_id": product_id, "quantity": "5"})
    assert restocked["stock_available"] == "15"
    call(
        write,
        f"{CATALOG}/UpdateProductPrice",
        {"product_id": product_id, "price": {"currency_code": "EUR", "amount_minor": "1400"}},
    )
    product = await eventually(replica_1, f"{PRODUCTS}/GetProduct", {"product_id": product_id}, '"1400"')
    assert product["product"]["stock_available"] == "15"
    listed = call(replica_2, f"{PRODUCTS}/ListProducts", {"page_size": 20})
    assert listed["products"]

    placed = call(
        write,
        f"{ORDERS}/PlaceOrder",
        {
            "customer_id": user["user_id"],
            "items": [{"sku": sku.lower(), "quantity": "2"}],
            "shipping_address": {
                "recipient": "Ada Lovelace",
                "line1": "12 St James Square",
                "city": "London",
                "postal_code": "SW1Y 4JH",
                "country_code": "GB",
            },
            "notes": "ring twice",
        },
        f"idempotency-key: checkout-{unique}",
    )
    order_id = placed["order_id"]
    assert placed["lines"][0]["unit_price"] == {"currency_code": "EUR", "amount_minor": "1400"}  # from the catalog

    seen = call(
        replica_1,
        f"{ORDER_QUERIES}/GetOrder",
        {"order_id": order_id, "consistency_token": placed["consistency_token"], "max_wait_ms": 5000},
    )
    assert seen["order"]["customer_name"] == "Ada Lovelace"
    assert "stale" not in seen
    confirmed = await eventually(
        replica_2, f"{ORDER_QUERIES}/GetOrder", {"order_id": order_id}, "ORDER_STATUS_CONFIRMED"
    )
    assert confirmed["order"]["total"] == {"currency_code": "EUR", "amount_minor": "2800"}

    refused = grpcurl(
        "-d",
        json.dumps({"order_id": order_id, "item": {"sku": sku, "quantity": "1"}}),
        write,
        f"{ORDERS}/AddOrderItem",
    )
    assert "Code: FailedPrecondition" in refused.stderr
    assert "pending" in refused.stderr

    call(write, f"{ORDERS}/ShipOrder", {"order_id": order_id, "carrier": "DHL", "tracking_number": "JD014600006281"})
    by_customer = await eventually(
        replica_1,
        f"{ORDER_QUERIES}/ListOrdersByCustomer",
        {"customer_id": user["user_id"], "statuses": ["ORDER_STATUS_SHIPPED"], "page_size": 10},
        order_id,
    )
    assert [o["order_id"] for o in by_customer["orders"]] == [order_id]
    found = call(
        replica_1,
        f"{ORDER_QUERIES}/SearchOrders",
        {
            "text": f"ada.{unique}",
            "statuses": ["ORDER_STATUS_CONFIRMED", "ORDER_STATUS_SHIPPED"],
            "placed_from": "2026-01-01T00:00:00Z",
            "sort_by": "ORDER_SORT_FIELD_TOTAL",
        },
    )
    assert [o["order_id"] for o in found["orders"]] == [order_id]
    today = datetime.now(UTC).date().isoformat()
    stats = call(
        replica_2,
        f"{ORDER_QUERIES}/GetOrderStatistics",
        {"from_date": today, "to_date": today, "currency_code": "EUR", "top_products": 5},
    )
    assert int(stats["total_orders"]) >= 1

    shipped_cancel = grpcurl(
        "-d", json.dumps({"order_id": order_id, "reason": "changed my mind"}), write, f"{ORDERS}/CancelOrder"
    )
    assert "Code: FailedPrecondition" in shipped_cancel.stderr

    saga = call(write, f"{SAGAS}/GetSaga", {"id": order_id})
    assert saga["saga"]["status"] == "SAGA_STATUS_COMPLETED"
    assert saga["saga"]["steps"]
    call(write, f"{SAGAS}/ListSagas", {"status": "SAGA_STATUS_FAILED"})

    payment = call(stack.provider_address, f"{PROVIDER}/GetPayment", {"reference": order_id})
    assert payment["payment"]["state"] == "PAYMENT_STATE_CAPTURED"
    assert payment["payment"]["captures"] == 1
