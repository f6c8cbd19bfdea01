"""The order saga end to end: write service, relays, replicas, the payment provider and a saga
worker as real processes. Outcomes are checked in Postgres and with the provider's ListPayments."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from devstack.supervisor import Stack
from tessera.common.v1.money_pb2 import Money
from tessera.orders.v1 import order_command_service_pb2 as orders
from tessera.orders.v1 import order_pb2
from tessera.orders.v1 import saga_admin_service_pb2 as saga_pb
from tessera.payments.v1 import payment_provider_admin_pb2 as admin_pb
from tessera.payments.v1 import payment_provider_admin_pb2_grpc as admin_grpc
from tessera.payments.v1 import payment_provider_pb2 as pay
from tessera.payments.v1 import payment_provider_pb2_grpc as pay_grpc
from tessera_client import FailedPrecondition, TesseraClient
from tests.e2e.conftest import e2e_config, running_stack

pytestmark = pytest.mark.e2e

CALL_S = 10.0
ADDRESS = order_pb2.Address(
    recipient="Ada Lovelace", line1="1 Saga Street", city="London", postal_code="N1 9GU", country_code="GB"
)
SAGA_ENV = {
    "SAGA_MAX_ATTEMPTS": "3",
    "SAGA_BACKOFF_BASE_MS": "20",
    "SAGA_BACKOFF_CAP_MS": "200",
    "SAGA_POLL_INTERVAL_S": "0.5",
    "PAYMENT_PROVIDER_TIMEOUT_S": "0.5",
    # High enough that the breaker (covered by the integration tests) stays out of these paths.
    "SAGA_BREAKER_FAILURE_THRESHOLD": "100",
}


@dataclass
class Shop:
    """Clients of one running stack, and helpers to drive it."""

    stack: Stack
    pool: asyncpg.Pool[Any]
    tessera: TesseraClient  # tessera's own API, through the client library
    provider: grpc.aio.Channel

    async def customer(self) -> str:
        """A newly registered, active customer."""
        tag = secrets.token_hex(4)
        reply = await self.tessera.users.register_user(
            email=f"buyer.{tag}@example.com",
            username=f"buyer_{tag}",
            password="saga-Pa55word-e2e",
            full_name=f"Buyer {tag}",
        )
        return reply.user_id

    async def product(self, stock: int, price_minor: int = 1250) -> tuple[str, str]:
        """A product with `stock` units: (id, sku)."""
        sku = f"E2E-{secrets.token_hex(4).upper()}"
        reply = await self.tessera.catalog.add_product(
            sku=sku,
            name=f"Widget {sku}",
            price=Money(currency_code="EUR", amount_minor=price_minor),
            initial_stock=stock,
        )
        return reply.product_id, sku

    async def restock(self, product_id: str, quantity: int) -> None:
        """RestockProduct."""
        await self.tessera.catalog.restock_product(product_id=product_id, quantity=quantity)

    async def place(self, customer_id: str, *items: tuple[str, int], idempotency_key: str = "") -> str:
        """PlaceOrder (with an idempotency key when given); the order id."""
        reply = await self.tessera.orders.place_order(
            orders.PlaceOrderRequest(
                customer_id=customer_id,
                items=[orders.OrderItem(sku=sku, quantity=quantity) for sku, quantity in items],
                shipping_address=ADDRESS,
            ),
            idempotency_key=idempotency_key or None,
        )
        return reply.order_id

    async def cancel(self, order_id: str, reason: str = "changed my mind") -> None:
        """CancelOrder."""
        await self.tessera.orders.cancel_order(order_id=order_id, reason=reason)

    async def configure(self, **fields: Any) -> None:
        """Replace the provider's injected failures."""
        await admin_grpc.PaymentProviderAdminServiceStub(self.provider).Configure(
            admin_pb.ConfigureRequest(configuration=admin_pb.FailureConfiguration(**fields)), timeout=CALL_S
        )

    async def saga(self, order_id: str) -> asyncpg.Record:
        """The order's saga row."""
        row: asyncpg.Record | None = await self.pool.fetchrow(
            "SELECT id, status, current_step, attempts, last_error FROM saga_executions WHERE order_id = $1",
            uuid.UUID(order_id),
        )
        assert row is not None
        return row

    async def settled(self, order_id: str, within: float = 30.0, statuses: tuple[str, ...] = ("completed",)) -> str:
        """Wait until the order's saga is in one of `statuses`; return the order's status."""
        deadline = time.monotonic() + within
        while (await self.saga(order_id))["status"] not in statuses:
            if time.monotonic() > deadline:
                raise AssertionError(f"saga of {order_id} still {(await self.saga(order_id))['status']}")
            await asyncio.sleep(0.05)
        return await self.order_status(order_id)

    async def order_status(self, order_id: str) -> str:
        """The order's status in Postgres."""
        status: str = await self.pool.fetchval("SELECT status FROM orders WHERE id = $1", uuid.UUID(order_id))
        return status

    async def stock(self, product_id: str) -> int:
        """Units available of the product in Postgres."""
        value = await self.pool.fetchval("SELECT stock_available FROM products WHERE id = $1", uuid.UUID(product_id))
        return int(value)

    async def payments(self) -> dict[str, pay.Payment]:
        """Every payment the provider holds, by reference."""
        listing = await pay_grpc.PaymentProviderServiceStub(self.provider).ListPayments(
            pay.ListPaymentsRequest(), timeout=CALL_S
        )
        return {p.reference: p for p in listing.payments}

    async def steps(self, order_id: str) -> list[tuple[str, str]]:
        """(step, outcome) of the order's saga log."""
        rows = await self.pool.fetch(
            "SELECT s.step, s.outcome FROM saga_steps s JOIN saga_executions e ON e.id = s.saga_id"
            " WHERE e.order_id = $1 ORDER BY s.id",
            uuid.UUID(order_id),
        )
        return [(r["step"], r["outcome"]) for r in rows]


@pytest.fixture(scope="module")
async def shop(e2e_database: str, redis_server_url: str, e2e_prefix: str, e2e_logs: Path) -> AsyncIterator[Shop]:
    """The whole stack with one saga worker; no authentication."""
    config = e2e_config(
        e2e_database, redis_server_url, e2e_prefix, e2e_logs, saga_env=SAGA_ENV, relays=1, read_ports=(0,)
    )
    async with running_stack(config, redis_server_url) as stack:
        pool: asyncpg.Pool[Any] = await asyncpg.create_pool(e2e_database, min_size=1, max_size=4)
        tessera = TesseraClient(stack.write_address, stack.read_addresses, timeout=CALL_S)
        provider = grpc.aio.insecure_channel(stack.provider_address)
        try:
            yield Shop(stack, pool, tessera, provider)
        finally:
            await tessera.close()
            await provider.close()
            await pool.close()


@pytest.fixture
async def clean_provider(shop: Shop) -> AsyncIterator[Shop]:
    """The shop with every injected failure off before and after the test."""
    await shop.configure()
    yield shop
    await shop.configure()


async def test_happy_path_confirms_and_captures_exactly_once(clean_provider: Shop) -> None:
    shop = clean_provider
    customer = await shop.customer()
    product, sku = await shop.product(10, 1250)
    order_id = await shop.place(customer, (sku, 3))
    assert await shop.settled(order_id) == "confirmed"
    assert await shop.stock(product) == 7
    paid = (await shop.payments())[order_id]
    assert (paid.state, paid.captures, paid.refunds) == (pay.PAYMENT_STATE_CAPTURED, 1, 0)
    assert paid.amount.amount_minor == 3750
    # The saga's events carry the placing request's correlation id and continue its trace.
    rows = await shop.pool.fetch(
        "SELECT event_type, aggregate_type, correlation_id, causation_id, traceparent FROM outbox"
        " WHERE aggregate_id = $1 OR (aggregate_type = 'product' AND aggregate_id = $2) ORDER BY id",
        order_id,
        product,
    )
    placed, *saga_events = [r for r in rows if r["event_type"] != "tessera.catalog.v1.ProductAdded"]
    assert placed["event_type"] == "tessera.orders.v1.OrderPlaced"
    assert [r["event_type"].rsplit(".", 1)[1] for r in saga_events] == [
        "StockReserved",
        "PaymentAuthorized",
        "PaymentCaptured",
        "OrderConfirmed",
    ]
    trace_id = placed["traceparent"].split("-")[1]
    for event in saga_events:
        assert event["correlation_id"] == placed["correlation_id"]
        assert event["causation_id"].startswith("saga:")
        assert event["traceparent"].split("-")[1] == trace_id


async def test_out_of_stock_is_rejected_with_the_sku(clean_provider: Shop) -> None:
    shop = clean_provider
    customer = await shop.customer()
    product, sku = await shop.product(2)
    order_id = await shop.place(customer, (sku, 5))
    assert await shop.settled(order_id) == "rejected"
    reason = await shop.pool.fetchval("SELECT reason FROM orders WHERE id = $1", uuid.UUID(order_id))
    assert f"sku {sku} (requested 5, available 2)" in reason
    assert await shop.stock(product) == 2
    assert order_id not in await shop.payments()


async def test_declined_payment_cancels_and_releases_stock(clean_provider: Shop) -> None:
    shop = clean_provider
    customer = await shop.customer()
    product, sku = await shop.product(5)
    await shop.configure(decline_customer_ids=[customer])
    order_id = await shop.place(customer, (sku, 4))
    assert await shop.settled(order_id) == "cancelled"
    row = await shop.pool.fetchrow("SELECT reason, cancelled_by FROM orders WHERE id = $1", uuid.UUID(order_id))
    assert row is not None
    assert row["cancelled_by"] == "system"
    assert row["reason"].startswith("payment declined")
    assert await shop.stock(product) == 5
    paid = (await shop.payments())[order_id]
    assert (paid.state, paid.captures) == (pay.PAYMENT_STATE_DECLINED, 0)


async def test_unavailable_and_timeouts_are_retried_then_confirmed(clean_provider: Shop) -> None:
    shop = clean_provider
    customer = await shop.customer()
    product, sku = await shop.product(5)
    await shop.configure(
        scripted_failures=[
            admin_pb.ScriptedFailure(
                customer_id=customer,
                method=admin_pb.PROVIDER_METHOD_AUTHORIZE,
                kind=admin_pb.FAILURE_KIND_UNAVAILABLE,
                times=1,
            ),
            admin_pb.ScriptedFailure(
                customer_id=customer,
                method=admin_pb.PROVIDER_METHOD_CAPTURE,
                kind=admin_pb.FAILURE_KIND_TIMEOUT_APPLIED,
                times=1,
            ),
        ]
    )
    order_id = await shop.place(customer, (sku, 2))
    assert await shop.settled(order_id) == "confirmed"
    assert await shop.stock(product) == 3
    paid = (await shop.payments())[order_id]
    assert (paid.state, paid.captures) == (pay.PAYMENT_STATE_CAPTURED, 1)  # the timed-out capture counted once
    assert await shop.steps(order_id) == [
        ("reserve_stock", "succeeded"),
        ("authorize_payment", "retrying"),
        ("authorize_payment", "succeeded"),
        ("capture_and_confirm", "retrying"),
        ("capture_and_confirm", "succeeded"),
    ]


async def test_attempt_cap_parks_the_saga_and_retry_saga_completes_it(clean_provider: Shop) -> None:
    shop = clean_provider
    customer = await shop.customer()
    product, sku = await shop.product(5)
    await shop.configure(
        scripted_failures=[
            admin_pb.ScriptedFailure(
                customer_id=customer,
                method=admin_pb.PROVIDER_METHOD_AUTHORIZE,
                kind=admin_pb.FAILURE_KIND_UNAVAILABLE,
                times=3,
            )
        ]
    )
    order_id = await shop.place(customer, (sku, 1))
    assert await shop.settled(order_id, statuses=("failed",)) == "reserved"
    admin = shop.tessera.orders
    listed = await admin.list_sagas(status=saga_pb.SAGA_STATUS_FAILED)
    parked = [s for s in listed.sagas if s.order_id == order_id]
    assert len(parked) == 1
    assert (parked[0].attempts, parked[0].current_step) == (3, "authorize_payment")
    assert "UNAVAILABLE" in parked[0].last_error
    retried = await admin.retry_saga(id=order_id)
    assert retried.saga.status == saga_pb.SAGA_STATUS_RUNNING
    assert await shop.settled(order_id) == "confirmed"
    assert await shop.stock(product) == 4
    with pytest.raises(FailedPrecondition):
        await admin.retry_saga(id=order_id)


async def test_cancel_of_a_confirmed_order_releases_stock_and_refunds(clean_provider: Shop) -> None:
    shop = clean_provider
    customer = await shop.customer()
    product, sku = await shop.product(6)
    order_id = await shop.place(customer, (sku, 6))
    assert await shop.settled(order_id) == "confirmed"
    assert await shop.stock(product) == 0
    await shop.cancel(order_id)
    assert await shop.settled(order_id) == "cancelled"
    assert await shop.stock(product) == 6
    paid = (await shop.payments())[order_id]
    assert (paid.state, paid.captures, paid.refunds) == (pay.PAYMENT_STATE_REFUNDED, 1, 1)
    events = await shop.pool.fetch(
        "SELECT event_type FROM outbox WHERE aggregate_type = 'order' AND aggregate_id = $1 ORDER BY aggregate_version",
        order_id,
    )
    assert events[-1]["event_type"] == "tessera.orders.v1.PaymentRefunded"
