"""Product and order views end to end: commands on the write service, the saga worker and the payment
provider produce events; the relay publishes them; both read replicas answer the catalog, order and
user queries from their views. Also measures how soon a placed order is visible on a replica."""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from devstack.supervisor import Stack
from tessera.catalog.v1 import catalog_command_service_pb2 as catalog
from tessera.catalog.v1 import product_query_service_pb2 as products
from tessera.common.v1.money_pb2 import Money
from tessera.orders.v1 import order_command_service_pb2 as order_cmds
from tessera.orders.v1 import order_pb2
from tessera.orders.v1 import order_query_service_pb2 as order_views
from tessera.orders.v1 import order_query_service_pb2_grpc as order_views_grpc
from tessera.payments.v1 import payment_provider_admin_pb2 as admin_pb
from tessera.payments.v1 import payment_provider_admin_pb2_grpc as admin_grpc
from tessera.users.v1 import user_command_service_pb2 as users
from tessera.users.v1 import user_query_service_pb2 as user_views
from tessera.users.v1 import user_query_service_pb2_grpc as user_views_grpc
from tessera_client import NotFound, TesseraClient
from tessera_client.client import CatalogAPI, OrdersAPI, UsersAPI
from tests.e2e.conftest import e2e_config, running_stack

pytestmark = pytest.mark.e2e

CALL_S = 10.0
S = order_pb2.OrderStatus
ADDRESS = order_pb2.Address(
    recipient="Ada Lovelace", line1="1 View Street", city="London", postal_code="N1 9GU", country_code="GB"
)
SAGA_ENV = {
    "SAGA_MAX_ATTEMPTS": "3",
    "SAGA_BACKOFF_BASE_MS": "20",
    "SAGA_BACKOFF_CAP_MS": "200",
    "SAGA_POLL_INTERVAL_S": "0.5",
    "PAYMENT_PROVIDER_TIMEOUT_S": "2",
    "SAGA_BREAKER_FAILURE_THRESHOLD": "100",
}
LATENCY_ORDERS = 200


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 30.0, message: str = "not in time") -> Any:
    """Retry an async check until it returns something truthy; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(message)
        await asyncio.sleep(0.05)


@dataclass
class Shop:
    """Clients of one running stack: the client library for tessera's services (commands through
    `tessera`, each replica's queries through its own client), the payment provider's admin channel,
    and raw channels to the replicas for the watch streams test_watch checks on the wire."""

    stack: Stack
    pool: asyncpg.Pool[Any]
    tessera: TesseraClient
    provider: grpc.aio.Channel
    readers: list[TesseraClient]
    replicas: list[grpc.aio.Channel]

    def products(self, replica: int = 0) -> CatalogAPI:
        return self.readers[replica].catalog

    def orders(self, replica: int = 0) -> OrdersAPI:
        return self.readers[replica].orders

    def users(self, replica: int = 0) -> UsersAPI:
        return self.readers[replica].users

    def raw_orders(self, replica: int = 0) -> Any:
        """The generated stub on a raw channel: a watch stream exactly as the replica sends it."""
        return order_views_grpc.OrderQueryServiceStub(self.replicas[replica])

    def raw_users(self, replica: int = 0) -> Any:
        """The generated stub on a raw channel: a watch stream exactly as the replica sends it."""
        return user_views_grpc.UserQueryServiceStub(self.replicas[replica])

    async def customer(self, full_name: str) -> str:
        tag = secrets.token_hex(4)
        reply = await self.tessera.users.register_user(
            users.RegisterUserRequest(
                email=f"{full_name.split(maxsplit=1)[0].lower()}.{tag}@example.com",
                username=f"u_{tag}",
                password="views-Pa55word-e2e",
                full_name=full_name,
            ),
            timeout=CALL_S,
        )
        return str(reply.user_id)

    async def product(self, name: str, stock: int, price_minor: int) -> tuple[str, str]:
        sku = f"V-{secrets.token_hex(3).upper()}"
        reply = await self.tessera.catalog.add_product(
            catalog.AddProductRequest(
                sku=sku, name=name, price=Money(currency_code="EUR", amount_minor=price_minor), initial_stock=stock
            ),
            timeout=CALL_S,
        )
        return str(reply.product_id), sku

    async def place(self, customer_id: str, *items: tuple[str, int]) -> order_cmds.PlaceOrderResponse:
        reply: order_cmds.PlaceOrderResponse = await self.tessera.orders.place_order(
            order_cmds.PlaceOrderRequest(
                customer_id=customer_id,
                items=[order_cmds.OrderItem(sku=sku, quantity=quantity) for sku, quantity in items],
                shipping_address=ADDRESS,
                notes="ring twice",
            ),
            timeout=CALL_S,
        )
        return reply

    async def saga_done(self, order_id: str, within: float = 30.0) -> str:
        """Wait until the order's saga has completed; the order's status in Postgres."""

        async def done() -> str | None:
            row = await self.pool.fetchrow(
                "SELECT e.status, o.status AS order_status FROM saga_executions e JOIN orders o ON o.id = e.order_id"
                " WHERE e.order_id = $1",
                uuid.UUID(order_id),
            )
            return None if row is None or row["status"] != "completed" else str(row["order_status"])

        status: str = await eventually(done, within, f"the saga of {order_id} did not complete")
        return status

    async def view(self, order_id: str, status: int, replica: int = 0) -> order_views.OrderView:
        """The order's view once it shows `status` (and, when paid matters, the payment events with it)."""

        async def shown() -> order_views.OrderView | None:
            try:
                reply = await self.orders(replica).get_order(order_views.GetOrderRequest(order_id=order_id), timeout=5)
            except NotFound:
                return None
            view: order_views.OrderView = reply.order
            return view if view.status == status else None

        view: order_views.OrderView = await eventually(shown, message=f"order {order_id} never showed {status}")
        return view

    async def drained(self) -> None:
        """Wait until both replicas' order and catalog views reflect every event positioned so far."""

        async def all_positioned() -> bool:
            return not await self.pool.fetchval("SELECT count(*) FROM outbox WHERE position IS NULL")

        await eventually(all_positioned, message="the relay did not position every event")
        head = int(await self.pool.fetchval("SELECT last_position FROM relay_state"))
        assert head > 0

        async def caught_up() -> bool:
            for index in range(len(self.replicas)):
                reply = await self.orders(index).search_orders(order_views.SearchOrdersRequest(page_size=1), timeout=5)
                listed = await self.products(index).list_products(products.ListProductsRequest(page_size=1), timeout=5)
                if reply.view_position < head or listed.view_position < head:
                    return False
            return True

        await eventually(caught_up, message="the replicas did not reach the log's head")


@pytest.fixture(scope="module")
async def shop(e2e_database: str, redis_server_url: str, e2e_prefix: str, e2e_logs: Path) -> AsyncIterator[Shop]:
    config = e2e_config(e2e_database, redis_server_url, e2e_prefix, e2e_logs, saga_env=SAGA_ENV, relays=1)
    async with running_stack(config, redis_server_url) as stack, opened_shop(stack, e2e_database) as opened:
        yield opened


@asynccontextmanager
async def opened_shop(stack: Stack, database_url: str) -> AsyncIterator[Shop]:
    """Clients of every service of a running stack and a pool on its database; closed on the way out.

    No consistency session: a test passes a consistency token where it means to. Queries that a
    replica answers UNAVAILABLE while it catches up are retried by the client's read channel.
    """
    pool: asyncpg.Pool[Any] = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    tessera = TesseraClient(stack.write_address, stack.read_addresses, timeout=CALL_S, session=False)
    readers = [
        TesseraClient(stack.write_address, [address], timeout=CALL_S, session=False) for address in stack.read_addresses
    ]
    provider = grpc.aio.insecure_channel(stack.provider_address)
    replicas = [grpc.aio.insecure_channel(address) for address in stack.read_addresses]
    try:
        yield Shop(stack, pool, tessera, provider, readers, replicas)
    finally:
        for channel in (provider, *replicas):
            await channel.close()
        for client in (tessera, *readers):
            await client.close()
        await pool.close()


@dataclass
class Scenario:
    ada: str
    grace: str
    anvil: tuple[str, str]
    bolt: tuple[str, str]
    chisel: tuple[str, str]
    confirmed: str
    shipped: str
    rejected: str
    declined: str
    refunded: str
    pending_ids: list[str]


@pytest.fixture(scope="module")
async def scenario(shop: Shop) -> Scenario:
    """Every order outcome the saga has, placed through the real commands."""
    admin = admin_grpc.PaymentProviderAdminServiceStub(shop.provider)
    await admin.Configure(admin_pb.ConfigureRequest(configuration=admin_pb.FailureConfiguration()), timeout=CALL_S)
    ada = await shop.customer("Ada Lovelace")
    grace = await shop.customer("Grace Hopper")
    anvil = await shop.product("Anvil", 10, 1999)
    bolt = await shop.product("Bolt", 50, 250)
    chisel = await shop.product("Chisel", 3, 500)
    write_catalog = shop.tessera.catalog
    await write_catalog.restock_product(catalog.RestockProductRequest(product_id=bolt[0], quantity=25), timeout=CALL_S)

    confirmed = (await shop.place(ada, (anvil[1], 2), (bolt[1], 3))).order_id
    shipped = (await shop.place(grace, (bolt[1], 4))).order_id
    rejected = (await shop.place(ada, (chisel[1], 5))).order_id
    refunded = (await shop.place(ada, (anvil[1], 1))).order_id
    assert await shop.saga_done(confirmed) == "confirmed"
    assert await shop.saga_done(shipped) == "confirmed"
    assert await shop.saga_done(rejected) == "rejected"
    assert await shop.saga_done(refunded) == "confirmed"

    await admin.Configure(
        admin_pb.ConfigureRequest(configuration=admin_pb.FailureConfiguration(decline_customer_ids=[grace])),
        timeout=CALL_S,
    )
    declined = (await shop.place(grace, (anvil[1], 1))).order_id
    assert await shop.saga_done(declined) == "cancelled"
    await admin.Configure(admin_pb.ConfigureRequest(configuration=admin_pb.FailureConfiguration()), timeout=CALL_S)

    order_commands = shop.tessera.orders
    await order_commands.ship_order(
        order_cmds.ShipOrderRequest(order_id=shipped, carrier="DHL", tracking_number="JD000123"), timeout=CALL_S
    )
    await order_commands.cancel_order(order_cmds.CancelOrderRequest(order_id=refunded, reason="changed my mind"))
    assert await shop.saga_done(refunded) == "cancelled"
    await write_catalog.discontinue_product(
        catalog.DiscontinueProductRequest(product_id=chisel[0], reason="recalled"), timeout=CALL_S
    )
    await shop.drained()
    return Scenario(ada, grace, anvil, bolt, chisel, confirmed, shipped, rejected, declined, refunded, [])


async def test_products_and_their_stock_on_both_replicas(shop: Shop, scenario: Scenario) -> None:
    for replica in range(len(shop.replicas)):
        for product_id, _ in (scenario.anvil, scenario.bolt, scenario.chisel):
            view = (await shop.products(replica).get_product(products.GetProductRequest(product_id=product_id))).product
            stock = await shop.pool.fetchval(
                "SELECT stock_available FROM products WHERE id = $1", uuid.UUID(product_id)
            )
            assert view.stock_available == stock
        anvil = (
            await shop.products(replica).get_product(products.GetProductRequest(product_id=scenario.anvil[0]))
        ).product
        assert (anvil.name, anvil.price.amount_minor, anvil.stock_available) == ("Anvil", 1999, 10 - 2)
        bolt = (
            await shop.products(replica).get_product(products.GetProductRequest(product_id=scenario.bolt[0]))
        ).product
        assert bolt.stock_available == 50 + 25 - 3 - 4
        listed = await shop.products(replica).list_products(products.ListProductsRequest(page_size=100))
        assert scenario.chisel[1] not in [p.sku for p in listed.products]
        everything = await shop.products(replica).list_products(
            products.ListProductsRequest(page_size=100, include_discontinued=True)
        )
        skus = [p.sku for p in everything.products]
        assert scenario.chisel[1] in skus
        assert skus == sorted(skus, key=str.lower)


async def test_order_views_and_status_history(shop: Shop, scenario: Scenario) -> None:
    confirmed = await shop.view(scenario.confirmed, S.ORDER_STATUS_CONFIRMED, replica=1)
    assert (confirmed.customer_id, confirmed.customer_name) == (scenario.ada, "Ada Lovelace")
    assert confirmed.customer_email.startswith("ada.")
    assert [(line.sku, line.product_name, line.quantity) for line in confirmed.lines] == [
        (scenario.anvil[1], "Anvil", 2),
        (scenario.bolt[1], "Bolt", 3),
    ]
    assert confirmed.total.amount_minor == 2 * 1999 + 3 * 250
    assert confirmed.paid is True
    assert [c.status for c in confirmed.status_history] == [
        S.ORDER_STATUS_PENDING,
        S.ORDER_STATUS_RESERVED,
        S.ORDER_STATUS_CONFIRMED,
    ]
    assert confirmed.notes == "ring twice"
    assert confirmed.shipping_address.city == "London"

    shipped = await shop.view(scenario.shipped, S.ORDER_STATUS_SHIPPED)
    assert (shipped.carrier, shipped.tracking_number, shipped.paid) == ("DHL", "JD000123", True)
    rejected = await shop.view(scenario.rejected, S.ORDER_STATUS_REJECTED)
    assert scenario.chisel[1] in rejected.reason
    assert rejected.status_history[-1].reason == rejected.reason
    declined = await shop.view(scenario.declined, S.ORDER_STATUS_CANCELLED)
    assert (declined.cancelled_by, declined.paid) == ("system", False)
    assert declined.reason.startswith("payment declined")
    refunded = await shop.view(scenario.refunded, S.ORDER_STATUS_CANCELLED)
    assert (refunded.reason, refunded.paid) == ("changed my mind", False)

    # The view carries the version of the order's last event in the log.
    version = await shop.pool.fetchval(
        "SELECT max(aggregate_version) FROM outbox WHERE aggregate_type = 'order' AND aggregate_id = $1",
        scenario.refunded,
    )
    assert refunded.version == version


async def test_list_orders_by_customer_and_search(shop: Shop, scenario: Scenario) -> None:
    stub = shop.orders()
    first = await stub.list_orders_by_customer(
        order_views.ListOrdersByCustomerRequest(customer_id=scenario.ada, page_size=2)
    )
    rest = await stub.list_orders_by_customer(
        order_views.ListOrdersByCustomerRequest(customer_id=scenario.ada, page_size=2, page_token=first.next_page_token)
    )
    ids = [o.order_id for o in [*first.orders, *rest.orders]]
    assert ids == [scenario.refunded, scenario.rejected, scenario.confirmed]  # newest first
    assert rest.next_page_token == ""
    cancelled = await stub.list_orders_by_customer(
        order_views.ListOrdersByCustomerRequest(customer_id=scenario.grace, statuses=[S.ORDER_STATUS_CANCELLED])
    )
    assert [o.order_id for o in cancelled.orders] == [scenario.declined]

    by_sku = await stub.search_orders(order_views.SearchOrdersRequest(text=scenario.bolt[1].lower()))
    assert {o.order_id for o in by_sku.orders} == {scenario.confirmed, scenario.shipped}
    by_name = await stub.search_orders(
        order_views.SearchOrdersRequest(text="hopper", sort_by=order_views.ORDER_SORT_FIELD_TOTAL)
    )
    assert [o.order_id for o in by_name.orders] == [scenario.declined, scenario.shipped]  # 1999 before 1000
    window = order_views.SearchOrdersRequest(statuses=[S.ORDER_STATUS_CONFIRMED, S.ORDER_STATUS_SHIPPED])
    window.placed_from.FromDatetime(datetime.now(UTC) - timedelta(hours=1))
    found = await stub.search_orders(window)
    assert {o.order_id for o in found.orders} == {scenario.confirmed, scenario.shipped}
    window.placed_from.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    assert list((await stub.search_orders(window)).orders) == []


async def test_order_statistics_and_user_figures(shop: Shop, scenario: Scenario) -> None:
    today = datetime.now(UTC).date()
    reply = await shop.orders(1).get_order_statistics(
        order_views.GetOrderStatisticsRequest(
            from_date=(today - timedelta(days=1)).isoformat(),
            to_date=(today + timedelta(days=1)).isoformat(),
            currency_code="EUR",
        )
    )
    confirmed_total = 2 * 1999 + 3 * 250
    shipped_total = 4 * 250
    assert reply.total_orders == 5
    assert reply.revenue.amount_minor == confirmed_total + shipped_total
    assert reply.average_order_value.amount_minor == (confirmed_total + shipped_total) // 2
    counts = {s.status: s.count for s in reply.orders_by_status}
    assert (counts[S.ORDER_STATUS_CONFIRMED], counts[S.ORDER_STATUS_SHIPPED]) == (1, 1)
    assert (counts[S.ORDER_STATUS_CANCELLED], counts[S.ORDER_STATUS_REJECTED], counts[S.ORDER_STATUS_PENDING]) == (
        2,
        1,
        0,
    )
    assert [(p.sku, p.quantity) for p in reply.top_products] == [(scenario.bolt[1], 7), (scenario.anvil[1], 2)]
    assert sum(day.orders for day in reply.daily) == 5

    ada = (await shop.users().get_user(user_views.GetUserRequest(user_id=scenario.ada))).user
    assert ada.order_count == 3
    assert [(m.currency_code, m.amount_minor) for m in ada.total_spent] == [("EUR", confirmed_total)]
    assert ada.last_order_at.ToDatetime(tzinfo=UTC) > datetime.now(UTC) - timedelta(hours=1)
    grace = (await shop.users(1).get_user(user_views.GetUserRequest(user_id=scenario.grace))).user
    assert (grace.order_count, [m.amount_minor for m in grace.total_spent]) == (2, [shipped_total])


async def test_time_from_place_order_to_visible_on_a_replica(shop: Shop, scenario: Scenario) -> None:
    """PlaceOrder, then GetOrder with the reply's consistency token on a replica (alternating): the
    replica answers as soon as its view has the order, woken by its projector."""
    product_id, sku = await shop.product("Latency probe", LATENCY_ORDERS * 2, 100)
    customer = await shop.customer("Lat Ency")
    delays: list[float] = []
    for index in range(LATENCY_ORDERS):
        reply = await shop.place(customer, (sku, 1))
        replied = time.perf_counter()
        seen = await shop.orders(index % len(shop.replicas)).get_order(
            order_views.GetOrderRequest(
                order_id=reply.order_id, consistency_token=reply.consistency_token, max_wait_ms=5000
            ),
            timeout=10,
        )
        delays.append(time.perf_counter() - replied)
        assert not seen.stale
        assert seen.order.order_id == reply.order_id
    delays.sort()
    median = statistics.median(delays) * 1000
    p99 = delays[int(len(delays) * 0.99) - 1] * 1000
    print(
        f"\norder visible on a replica after PlaceOrder's reply, {LATENCY_ORDERS} orders: "
        f"median {median:.1f} ms, p99 {p99:.1f} ms, max {delays[-1] * 1000:.1f} ms"
    )
    assert p99 < 2000
    assert product_id
