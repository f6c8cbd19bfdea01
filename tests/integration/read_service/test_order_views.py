"""Catalog and order views through the composed read service: real Postgres log, real Redis, real gRPC."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2

from read_service.bootstrap import ReadService, running_read_service
from shared_kernel.contracts.consistency import encode_token
from shared_kernel.contracts.event_log import NewEvent
from shared_kernel.platform.grpc_errors import bad_request_from_status
from tessera.catalog.v1 import product_query_service_pb2 as cpb
from tessera.catalog.v1.product_query_service_pb2_grpc import ProductQueryServiceStub
from tessera.orders.v1 import order_query_service_pb2 as opb
from tessera.orders.v1.order_pb2 import OrderStatus
from tessera.orders.v1.order_query_service_pb2_grpc import OrderQueryServiceStub
from tessera.users.v1 import user_query_service_pb2 as upb
from tessera.users.v1.user_query_service_pb2_grpc import UserQueryServiceStub
from tests.unit.read_service.order_events import Events

from .conftest import EventLog, UserFactory, eventually
from .test_service import health_status, settings_for

if TYPE_CHECKING:
    from tessera.catalog.v1.product_query_service_pb2_grpc import ProductQueryServiceAsyncStub
    from tessera.orders.v1.order_query_service_pb2_grpc import OrderQueryServiceAsyncStub
    from tessera.users.v1.user_query_service_pb2_grpc import UserQueryServiceAsyncStub

pytestmark = pytest.mark.integration

S = OrderStatus


def violated_fields(error: grpc.aio.AioRpcError) -> list[str]:
    details = bad_request_from_status(error)
    assert details is not None
    return sorted(v.field for v in details.field_violations)


def at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2024, 3, day, hour, minute, tzinfo=UTC)


@dataclass
class World:
    """The scenario: two customers, four products, seven orders in every outcome."""

    events: Events = field(default_factory=Events)
    users: UserFactory = field(default_factory=UserFactory)
    log: list[NewEvent] = field(default_factory=list)
    ids: dict[str, str] = field(default_factory=dict)

    def build(self) -> None:
        ev = self.events
        ada, e = self.users.register("ada@example.com", "ada", "Ada Lovelace")
        grace, g = self.users.register("grace@example.com", "grace", "Grace Hopper")
        self.log += [e, g]
        anvil, a = ev.add_product("ABC-1", "Anvil", 1999, 100)
        bolt, b = ev.add_product("bolt-7", "Bolt", 250, 100)
        chisel, c = ev.add_product("C-3", "Chisel", 500, 5)
        usd, u = ev.add_product("USD-1", "Import", 333, 100, currency="USD")
        self.log += [a, b, c, u, ev.discontinue(chisel), ev.restock(bolt, 20)]
        self.ids.update(ada=ada, grace=grace, anvil=anvil, bolt=bolt, chisel=chisel, usd=usd)

        def place(name: str, customer: str, items: list[tuple[str, int]], when: datetime) -> str:
            person = "Ada Lovelace" if customer == ada else "Grace Hopper"
            email = "ada@example.com" if customer == ada else "grace@example.com"
            order_id, placed = ev.place(customer, items, name=person, email=email, when=when)
            ev.at(when)
            self.log.append(placed)
            self.ids[name] = order_id
            return order_id

        o1 = place("o1", ada, [(anvil, 2), (bolt, 3)], at(10, 10))
        self.log += [*ev.happy_path(o1), ev.ship(o1)]
        place("o2", ada, [(bolt, 1)], at(10, 12))
        o3 = place("o3", grace, [(anvil, 1000)], at(11, 9))
        self.log += ev.reservation_failed(o3, "not enough stock of ABC-1")
        o4 = place("o4", ada, [(anvil, 1)], at(11, 10))
        self.log += [*ev.happy_path(o4), ev.cancel(o4, S.ORDER_STATUS_CONFIRMED), *ev.release(o4), ev.refund(o4)]
        o5 = place("o5", grace, [(bolt, 4)], at(11, 11))
        self.log += ev.happy_path(o5)
        o6 = place("o6", grace, [(anvil, 1)], at(11, 12))
        self.log += [*ev.reserve(o6), ev.decline(o6, "card expired"), *ev.release(o6)]
        self.log.append(ev.cancel(o6, S.ORDER_STATUS_RESERVED, "payment declined: card expired", by="system"))
        o7 = place("o7", ada, [(usd, 3)], at(11, 13))
        self.log += ev.happy_path(o7)


@dataclass
class Replica:
    service: ReadService
    channel: grpc.aio.Channel
    products: ProductQueryServiceAsyncStub
    orders: OrderQueryServiceAsyncStub
    users: UserQueryServiceAsyncStub
    world: World

    def id(self, name: str) -> str:
        return self.world.ids[name]

    def names(self, orders: Any) -> list[str]:
        by_id = {v: k for k, v in self.world.ids.items()}
        return [by_id[o.order_id] for o in orders]


@pytest.fixture
async def replica(
    database_url: str, redis_server_url: str, redis_prefix: str, redis_client: Any, event_log: EventLog
) -> AsyncIterator[Replica]:
    world = World()
    world.build()
    await event_log.append(*world.log)
    settings = settings_for(database_url, redis_server_url, redis_prefix)
    async with running_read_service(settings) as service:
        head = await event_log.head()
        await eventually(
            lambda: all(p.ready and p.checkpoint == head for p in service.projectors),
            message="the projectors did not catch up",
        )
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
        try:
            yield Replica(
                service,
                channel,
                ProductQueryServiceStub(channel),
                OrderQueryServiceStub(channel),
                UserQueryServiceStub(channel),
                world,
            )
        finally:
            await channel.close()


async def test_every_service_is_served_and_healthy(replica: Replica) -> None:
    assert len(replica.service.projectors) == 3
    for service in ("", "tessera.catalog.v1.ProductQueryService", "tessera.orders.v1.OrderQueryService"):
        assert await health_status(replica.channel, service) == health_pb2.HealthCheckResponse.SERVING


async def test_products_and_their_stock(replica: Replica) -> None:
    expected = replica.world.events.products
    for name in ("anvil", "bolt", "chisel", "usd"):
        reply = await replica.products.GetProduct(cpb.GetProductRequest(product_id=replica.id(name)))
        product = expected[replica.id(name)]
        assert (reply.product.sku, reply.product.name) == (product.sku, product.name)
        assert reply.product.stock_available == product.stock
        assert reply.product.price == product.price
        assert reply.view_position > 0
    anvil = (await replica.products.GetProduct(cpb.GetProductRequest(product_id=replica.id("anvil")))).product
    assert anvil.stock_available == 100 - 2  # o1 kept its units; o4 and o6 released theirs
    chisel = (await replica.products.GetProduct(cpb.GetProductRequest(product_id=replica.id("chisel")))).product
    assert chisel.discontinued is True

    async def all_skus(include: bool) -> list[str]:
        skus: list[str] = []
        token = ""
        while True:
            reply = await replica.products.ListProducts(
                cpb.ListProductsRequest(page_size=2, page_token=token, include_discontinued=include)
            )
            skus += [p.sku for p in reply.products]
            token = reply.next_page_token
            if not token:
                return skus

    assert await all_skus(False) == ["ABC-1", "bolt-7", "USD-1"]
    assert await all_skus(True) == ["ABC-1", "bolt-7", "C-3", "USD-1"]
    first = await replica.products.ListProducts(cpb.ListProductsRequest(page_size=1))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await replica.products.ListProducts(
            cpb.ListProductsRequest(page_size=1, page_token=first.next_page_token, include_discontinued=True)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await replica.products.GetProduct(cpb.GetProductRequest(product_id="00000000-0000-0000-0000-000000000000"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_order_view_fields_and_status_history(replica: Replica) -> None:
    reply = await replica.orders.GetOrder(opb.GetOrderRequest(order_id=replica.id("o1")))
    order = reply.order
    assert (order.customer_id, order.customer_name, order.customer_email) == (
        replica.id("ada"),
        "Ada Lovelace",
        "ada@example.com",
    )
    assert [(line.sku, line.product_name, line.unit_price.amount_minor, line.quantity) for line in order.lines] == [
        ("ABC-1", "Anvil", 1999, 2),
        ("bolt-7", "Bolt", 250, 3),
    ]
    assert order.total.amount_minor == 4748
    assert order.status == S.ORDER_STATUS_SHIPPED
    assert [c.status for c in order.status_history] == [
        S.ORDER_STATUS_PENDING,
        S.ORDER_STATUS_RESERVED,
        S.ORDER_STATUS_CONFIRMED,
        S.ORDER_STATUS_SHIPPED,
    ]
    assert order.paid is True
    assert (order.carrier, order.tracking_number) == ("DHL", "JD0123")

    o4 = (await replica.orders.GetOrder(opb.GetOrderRequest(order_id=replica.id("o4")))).order
    assert (o4.status, o4.paid, o4.reason, o4.cancelled_by) == (
        S.ORDER_STATUS_CANCELLED,
        False,
        "changed my mind",
        "alice",
    )
    o3 = (await replica.orders.GetOrder(opb.GetOrderRequest(order_id=replica.id("o3")))).order
    assert (o3.status, o3.status_history[-1].reason) == (S.ORDER_STATUS_REJECTED, "not enough stock of ABC-1")
    o6 = (await replica.orders.GetOrder(opb.GetOrderRequest(order_id=replica.id("o6")))).order
    assert (o6.status, o6.cancelled_by) == (S.ORDER_STATUS_CANCELLED, "system")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await replica.orders.GetOrder(opb.GetOrderRequest(order_id=replica.id("ada")))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_list_orders_by_customer_pages_newest_first_and_filters(replica: Replica) -> None:
    first = await replica.orders.ListOrdersByCustomer(
        opb.ListOrdersByCustomerRequest(customer_id=replica.id("ada"), page_size=3)
    )
    assert replica.names(first.orders) == ["o7", "o4", "o2"]
    second = await replica.orders.ListOrdersByCustomer(
        opb.ListOrdersByCustomerRequest(customer_id=replica.id("ada"), page_size=3, page_token=first.next_page_token)
    )
    assert replica.names(second.orders) == ["o1"]
    assert second.next_page_token == ""

    filtered = await replica.orders.ListOrdersByCustomer(
        opb.ListOrdersByCustomerRequest(
            customer_id=replica.id("ada"), statuses=[S.ORDER_STATUS_CANCELLED, S.ORDER_STATUS_PENDING]
        )
    )
    assert replica.names(filtered.orders) == ["o4", "o2"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await replica.orders.ListOrdersByCustomer(
            opb.ListOrdersByCustomerRequest(customer_id=replica.id("grace"), page_token=first.next_page_token)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    nobody = await replica.orders.ListOrdersByCustomer(
        opb.ListOrdersByCustomerRequest(customer_id="00000000-0000-0000-0000-000000000001")
    )
    assert list(nobody.orders) == []


async def search(replica: Replica, page_size: int = 2, **fields: Any) -> list[str]:
    """Every page of a search, following tokens."""
    names: list[str] = []
    token = ""
    while True:
        reply = await replica.orders.SearchOrders(
            opb.SearchOrdersRequest(page_size=page_size, page_token=token, **fields)
        )
        names += replica.names(reply.orders)
        token = reply.next_page_token
        if not token:
            return names


async def test_search_orders_by_text_status_dates_and_sorts(replica: Replica) -> None:
    assert await search(replica) == ["o7", "o6", "o5", "o4", "o3", "o2", "o1"]
    assert await search(replica, text="ANVIL") == ["o6", "o4", "o3", "o1"]
    assert await search(replica, text="grace@") == ["o6", "o5", "o3"]
    assert await search(replica, text="hopper") == ["o6", "o5", "o3"]
    assert await search(replica, text="bolt-7") == ["o5", "o2", "o1"]
    assert await search(replica, statuses=[S.ORDER_STATUS_CANCELLED]) == ["o6", "o4"]
    window: dict[str, Any] = {"placed_from": None, "placed_to": None}
    request = opb.SearchOrdersRequest()
    request.placed_from.FromDatetime(at(11, 0))
    request.placed_to.FromDatetime(at(11, 11))
    window = {"placed_from": request.placed_from, "placed_to": request.placed_to}
    assert await search(replica, **window) == ["o4", "o3"]
    assert await search(replica, sort_direction=opb.ORDER_SORT_DIRECTION_ASC, **window) == ["o3", "o4"]
    assert await search(replica, sort_by=opb.ORDER_SORT_FIELD_TOTAL, **window) == ["o3", "o4"]

    by_total = await search(replica, sort_by=opb.ORDER_SORT_FIELD_TOTAL, sort_direction=opb.ORDER_SORT_DIRECTION_ASC)
    assert by_total[:3] == ["o2", "o7", "o5"] and by_total[-2:] == ["o1", "o3"]
    assert set(by_total[3:5]) == {"o4", "o6"}

    views = {}
    for name in ("o1", "o2", "o3", "o4", "o5", "o6", "o7"):
        views[name] = (await replica.orders.GetOrder(opb.GetOrderRequest(order_id=replica.id(name)))).order
    newest_change = sorted(views, key=lambda n: (views[n].updated_at.ToMicroseconds(), views[n].order_id), reverse=True)
    assert await search(replica, sort_by=opb.ORDER_SORT_FIELD_UPDATED_AT) == newest_change

    first = await replica.orders.SearchOrders(opb.SearchOrdersRequest(page_size=1, text="anvil"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await replica.orders.SearchOrders(
            opb.SearchOrdersRequest(page_size=1, text="bolt", page_token=first.next_page_token)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) == ["page_token"]


async def test_order_statistics_are_exact(replica: Replica) -> None:
    reply = await replica.orders.GetOrderStatistics(
        opb.GetOrderStatisticsRequest(from_date="2024-03-10", to_date="2024-03-11", currency_code="EUR")
    )
    assert reply.total_orders == 6
    assert (reply.revenue.currency_code, reply.revenue.amount_minor) == ("EUR", 4748 + 1000)
    assert reply.average_order_value.amount_minor == (4748 + 1000) // 2
    assert {s.status: s.count for s in reply.orders_by_status} == {
        S.ORDER_STATUS_PENDING: 1,
        S.ORDER_STATUS_RESERVED: 0,
        S.ORDER_STATUS_CONFIRMED: 1,
        S.ORDER_STATUS_SHIPPED: 1,
        S.ORDER_STATUS_CANCELLED: 2,
        S.ORDER_STATUS_REJECTED: 1,
    }
    assert [(p.sku, p.product_name, p.quantity) for p in reply.top_products] == [
        ("bolt-7", "Bolt", 7),
        ("ABC-1", "Anvil", 2),
    ]
    assert [(d.date, d.orders, d.revenue.amount_minor) for d in reply.daily] == [
        ("2024-03-10", 2, 4748),
        ("2024-03-11", 4, 1000),
    ]
    top_one = await replica.orders.GetOrderStatistics(
        opb.GetOrderStatisticsRequest(from_date="2024-03-11", to_date="2024-03-11", currency_code="EUR", top_products=1)
    )
    assert [(p.sku, p.quantity) for p in top_one.top_products] == [("bolt-7", 4)]
    usd = await replica.orders.GetOrderStatistics(
        opb.GetOrderStatisticsRequest(from_date="2024-01-01", to_date="2024-12-31", currency_code="USD")
    )
    assert (usd.total_orders, usd.revenue.amount_minor, len(usd.daily)) == (1, 999, 366)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await replica.orders.GetOrderStatistics(
            opb.GetOrderStatisticsRequest(from_date="2024-03-12", to_date="2024-03-11", currency_code="eur")
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(caught.value) == ["currency_code", "to_date"]


async def test_user_views_carry_order_figures(replica: Replica) -> None:
    ada = (await replica.users.GetUser(upb.GetUserRequest(user_id=replica.id("ada")))).user
    assert ada.order_count == 4
    assert ada.last_order_at.ToDatetime(tzinfo=UTC) == at(11, 13)
    assert [(m.currency_code, m.amount_minor) for m in ada.total_spent] == [("EUR", 4748), ("USD", 999)]
    listed = await replica.users.ListUsers(upb.ListUsersRequest(search="grace"))
    assert [(u.order_count, [(m.currency_code, m.amount_minor) for m in u.total_spent]) for u in listed.users] == [
        (3, [("EUR", 1000)])
    ]


async def test_consistency_tokens_for_products_and_orders(replica: Replica) -> None:
    o2 = replica.id("o2")
    reply = await replica.orders.GetOrder(
        opb.GetOrderRequest(order_id=o2, consistency_token=encode_token("order", o2, 1), max_wait_ms=1000)
    )
    assert reply.stale is False
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await replica.orders.GetOrder(
            opb.GetOrderRequest(order_id=o2, consistency_token=encode_token("order", o2, 9), max_wait_ms=1000)
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await replica.orders.SearchOrders(opb.SearchOrdersRequest(consistency_token=encode_token("user", o2, 1)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    anvil = replica.id("anvil")
    version = replica.world.events.versions[anvil]
    listed = await replica.products.ListProducts(
        cpb.ListProductsRequest(consistency_token=encode_token("product", anvil, version), max_wait_ms=1000)
    )
    assert listed.stale is False
    assert listed.view_position == replica.service.projectors[1].checkpoint


async def test_unavailable_and_not_serving_until_every_projector_caught_up(
    database_url: str, redis_server_url: str, redis_prefix: str, redis_client: Any, event_log: EventLog
) -> None:
    world = World()
    world.build()
    await event_log.append(*world.log)
    settings = settings_for(database_url, redis_server_url, redis_prefix)
    # Hold the event log locked so that no first catch-up can finish yet.
    blocker = await asyncpg.connect(database_url)
    transaction = blocker.transaction()
    await transaction.start()
    await blocker.execute("LOCK TABLE relay_state, outbox IN ACCESS EXCLUSIVE MODE")
    try:
        async with running_read_service(settings) as service:
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
            try:
                for name in ("tessera.catalog.v1.ProductQueryService", "tessera.orders.v1.OrderQueryService"):
                    assert await health_status(channel, name) == health_pb2.HealthCheckResponse.NOT_SERVING
                calls: list[Any] = [
                    ProductQueryServiceStub(channel).ListProducts(cpb.ListProductsRequest()),
                    OrderQueryServiceStub(channel).GetOrder(opb.GetOrderRequest(order_id=world.ids["o1"])),
                    OrderQueryServiceStub(channel).GetOrderStatistics(
                        opb.GetOrderStatisticsRequest(from_date="2024-03-10", to_date="2024-03-10", currency_code="EUR")
                    ),
                ]
                for call in calls:
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await call
                    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                await transaction.rollback()

                async def serving() -> bool:
                    return bool(await health_status(channel) == health_pb2.HealthCheckResponse.SERVING)

                await eventually(serving, message="health never became SERVING")
                assert all(p.ready for p in service.projectors)
                reply = await OrderQueryServiceStub(channel).GetOrder(opb.GetOrderRequest(order_id=world.ids["o1"]))
                assert reply.order.status == S.ORDER_STATUS_SHIPPED
            finally:
                await channel.close()
    finally:
        if not blocker.is_closed():
            await blocker.close()
