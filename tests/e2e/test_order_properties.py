"""Random sequences of catalog and order commands against a simple model, through the real processes.

One stack (write service, relays, two read replicas, the payment provider and a saga worker)
serves every example; each example works on its own customer and products, so nothing needs
a restart between examples. After every step the test waits until no saga is in flight, then
checks Postgres against the model (stock, order status). A background thread samples the
products' stock on a replica the whole time, sagas running included: it must never be
negative. At the end of each example, the read views on both replicas must equal the model
once the stream has drained, and the provider's books must show every confirmed or shipped
order captured exactly once and every cancelled or rejected order refunded or never charged.

The model: an order reserves all its lines or none (REJECTED, stock unchanged). A reserved
order whose total is above the provider's decline limit is declined: CANCELLED, stock back,
never charged. Otherwise it is CONFIRMED and charged once. Cancelling a confirmed order puts
its stock back and refunds it; shipped, cancelled and rejected orders cannot be cancelled,
and only confirmed ones can be shipped. An order cancelled right after placing races its
saga: it ends CANCELLED (the cancel won) or as the saga left it when the cancel was refused.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from devstack.supervisor import Stack
from tessera.catalog.v1 import catalog_command_service_pb2 as cat
from tessera.catalog.v1 import product_query_service_pb2 as pq
from tessera.common.v1.money_pb2 import Money
from tessera.orders.v1 import order_command_service_pb2 as oc
from tessera.orders.v1 import order_pb2
from tessera.orders.v1 import order_query_service_pb2 as oq
from tessera.payments.v1 import payment_provider_admin_pb2 as admin_pb
from tessera.payments.v1 import payment_provider_admin_pb2_grpc as admin_grpc
from tessera.payments.v1 import payment_provider_pb2 as pp
from tessera.payments.v1 import payment_provider_pb2_grpc as pp_grpc
from tessera.users.v1 import user_command_service_pb2 as uc
from tessera_client import SyncTesseraClient, TesseraError
from tests.e2e.conftest import e2e_config, running_stack

pytestmark = pytest.mark.e2e

CURRENCY = "EUR"
DECLINE_ABOVE_MINOR = 2_500  # the provider declines larger authorizations
CALL_TIMEOUT_S = 10.0
SETTLE_DEADLINE_S = 20.0
DRAIN_DEADLINE_S = 15.0
EXAMPLES = 50
STEPS = 25
FAULTY_EXAMPLES = 25
FAULTY_STEPS = 15

CONFIRMED = "confirmed"
SHIPPED = "shipped"
CANCELLED = "cancelled"
REJECTED = "rejected"
_VIEW_STATUS = {
    "pending": order_pb2.ORDER_STATUS_PENDING,
    "reserved": order_pb2.ORDER_STATUS_RESERVED,
    CONFIRMED: order_pb2.ORDER_STATUS_CONFIRMED,
    SHIPPED: order_pb2.ORDER_STATUS_SHIPPED,
    CANCELLED: order_pb2.ORDER_STATUS_CANCELLED,
    REJECTED: order_pb2.ORDER_STATUS_REJECTED,
}
ADDRESS = order_pb2.Address(
    recipient="Ada Lovelace", line1="1 Main St", city="Berlin", postal_code="10115", country_code="DE"
)


# --- the model ----------------------------------------------------------------------------


@dataclass
class ModelProduct:
    product_id: str
    sku: str
    name: str
    price: int
    stock: int


@dataclass
class ModelLine:
    product_id: str
    sku: str
    quantity: int
    unit_price: int


@dataclass
class ModelOrder:
    order_id: str
    lines: list[ModelLine]
    status: str = ""

    @property
    def total(self) -> int:
        return sum(line.quantity * line.unit_price for line in self.lines)

    @property
    def paid(self) -> bool:
        return self.status in (CONFIRMED, SHIPPED)


def predicted_outcome(order: ModelOrder, products: dict[str, ModelProduct]) -> str:
    """What the saga makes of `order` with the stock as the model has it."""
    wanted: dict[str, int] = {}
    for line in order.lines:
        wanted[line.product_id] = wanted.get(line.product_id, 0) + line.quantity
    if any(products[pid].stock < quantity for pid, quantity in wanted.items()):
        return REJECTED
    if order.total > DECLINE_ABOVE_MINOR:
        return CANCELLED
    return CONFIRMED


# --- access to the running system ---------------------------------------------------------


class Postgres:
    """A connection on a private event loop, so the synchronous state machine can query."""

    def __init__(self, url: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._conn: asyncpg.Connection[Any] = self._loop.run_until_complete(asyncpg.connect(url))

    def fetch(self, query: str, *args: object) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = self._loop.run_until_complete(self._conn.fetch(query, *args, timeout=10))
        return rows

    def close(self) -> None:
        self._loop.run_until_complete(self._conn.close(timeout=5))
        self._loop.close()


@dataclass
class World:
    """Channels and stubs to the stack, shared by every example."""

    stack: Stack
    db: Postgres
    # The client library's blocking API: commands to the write service, and each replica's queries
    # through a client reading from it alone.
    users: Any
    catalog: Any
    orders: Any
    product_views: list[Any]
    order_views: list[Any]
    payments: pp_grpc.PaymentProviderServiceStub
    provider_admin: admin_grpc.PaymentProviderAdminServiceStub
    sampler: StockSampler
    # How often each rule ran and how orders ended, over every example: proof the run covered ground.
    tally: Counter[str] = field(default_factory=Counter)


class StockSampler:
    """Samples the stock of the current example's products on a replica until stopped."""

    def __init__(self, write_address: str, address: str) -> None:
        self._client = SyncTesseraClient(write_address, [address], session=False)
        self._views = self._client.catalog
        self._lock = threading.Lock()
        self._products: list[str] = []
        self.samples = 0
        self.negatives: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stock-sampler", daemon=True)

    def watch(self, product_ids: list[str]) -> None:
        with self._lock:
            self._products = list(product_ids)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._client.close()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with self._lock:
                products = list(self._products)
            for product_id in products:
                try:
                    reply = self._views.get_product(pq.GetProductRequest(product_id=product_id), timeout=2)
                except TesseraError:
                    continue  # not projected yet
                self.samples += 1
                if reply.product.stock_available < 0:
                    self.negatives.append((product_id, reply.product.stock_available))


def code_of(call: Callable[[], object]) -> grpc.StatusCode | None:
    """Run a call; None when it succeeded, else its status code."""
    try:
        call()
    except TesseraError as exc:
        return exc.code
    return None


def wait_for(check: Callable[[], str | None], deadline_s: float, what: str) -> None:
    """Poll `check` (None: satisfied, else why not) until it is satisfied or the deadline passes."""
    end = time.monotonic() + deadline_s
    while True:
        problem = check()
        if problem is None:
            return
        if time.monotonic() >= end:
            raise AssertionError(f"{what} not reached within {deadline_s:g}s: {problem}")
        time.sleep(0.02)


# --- the state machine --------------------------------------------------------------------


def machine_for(world: World) -> type[RuleBasedStateMachine]:
    """The state machine class bound to one running stack."""

    class OrderMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.products: dict[str, ModelProduct] = {}
            self.orders: dict[str, ModelOrder] = {}
            self.customer_id = ""

        # -- set-up: a fresh customer and fresh products per example

        @initialize(
            prices=st.lists(st.integers(min_value=50, max_value=900), min_size=2, max_size=3),
            stocks=st.lists(st.integers(min_value=0, max_value=10), min_size=3, max_size=3),
        )
        def set_up(self, prices: list[int], stocks: list[int]) -> None:
            tag = secrets.token_hex(4)
            user = world.users.register_user(
                uc.RegisterUserRequest(
                    email=f"prop.{tag}@example.com",
                    username=f"prop_{tag}",
                    password="correct horse battery",
                    full_name=f"Property {tag}",
                ),
                timeout=CALL_TIMEOUT_S,
            )
            self.customer_id = user.user_id
            for index, price in enumerate(prices):
                sku = f"PROP-{tag}-{index}".upper()
                name = f"Gadget {tag} {index}"
                reply = world.catalog.add_product(
                    cat.AddProductRequest(
                        sku=sku,
                        name=name,
                        price=Money(currency_code=CURRENCY, amount_minor=price),
                        initial_stock=stocks[index],
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
                self.products[reply.product_id] = ModelProduct(reply.product_id, sku, name, price, stocks[index])
            world.sampler.watch(list(self.products))

        # -- rules

        @rule(data=st.data())
        def place_order(self, data: st.DataObject) -> None:
            order = self._place(data)
            if order is None:
                return
            expected = predicted_outcome(order, self.products)
            self._settle()
            self._follow(order, expected)

        @rule(data=st.data())
        def place_then_add_an_item(self, data: st.DataObject) -> None:
            order = self._place(data)
            if order is None:
                return
            others = [p for p in self.products.values() if all(line.product_id != p.product_id for line in order.lines)]
            if others:
                product = data.draw(st.sampled_from(others), label="added product")
                quantity = data.draw(st.integers(min_value=1, max_value=3), label="added quantity")
                code = code_of(
                    lambda: world.orders.add_order_item(
                        oc.AddOrderItemRequest(
                            order_id=order.order_id, item=oc.OrderItem(sku=product.sku, quantity=quantity)
                        ),
                        timeout=CALL_TIMEOUT_S,
                    )
                )
                # Accepted while the order was still pending; refused once its saga reserved stock.
                assert code in (None, grpc.StatusCode.FAILED_PRECONDITION), code
                world.tally["item added while pending" if code is None else "item refused after reservation"] += 1
                if code is None:
                    order.lines.append(ModelLine(product.product_id, product.sku, quantity, product.price))
            expected = predicted_outcome(order, self.products)
            self._settle()
            self._follow(order, expected)

        @rule(data=st.data())
        def place_then_cancel_at_once(self, data: st.DataObject) -> None:
            order = self._place(data)
            if order is None:
                return
            expected = predicted_outcome(order, self.products)
            code = code_of(
                lambda: world.orders.cancel_order(
                    oc.CancelOrderRequest(order_id=order.order_id, reason="changed my mind"), timeout=CALL_TIMEOUT_S
                )
            )
            self._settle()
            actual = self._status_in_postgres(order.order_id)
            world.tally["cancel won the race" if code is None else "cancel refused, saga ended first"] += 1
            if code is None:
                assert actual == CANCELLED, f"the cancel was accepted but the order is {actual}"
            else:
                # Refused: the saga had already ended the order (rejected, or cancelled after a decline).
                assert code == grpc.StatusCode.FAILED_PRECONDITION, code
                assert expected in (REJECTED, CANCELLED), f"cancel refused although the saga would confirm ({actual})"
                assert actual == expected
            order.status = actual
            # Whatever won the race, the stock is back where it was.

        @precondition(lambda self: bool(self.orders))
        @rule(data=st.data())
        def cancel_order(self, data: st.DataObject) -> None:
            order = self._pick_order(data)
            code = code_of(
                lambda: world.orders.cancel_order(
                    oc.CancelOrderRequest(order_id=order.order_id, reason="no longer needed"), timeout=CALL_TIMEOUT_S
                )
            )
            if order.status == CONFIRMED:
                world.tally["confirmed order cancelled"] += 1
                assert code is None, f"cancelling a confirmed order failed with {code}"
                order.status = CANCELLED
                for line in order.lines:
                    self.products[line.product_id].stock += line.quantity
            else:
                assert code == grpc.StatusCode.FAILED_PRECONDITION, f"cancelling a {order.status} order: {code}"
            self._settle()

        @precondition(lambda self: bool(self.orders))
        @rule(data=st.data())
        def ship_order(self, data: st.DataObject) -> None:
            order = self._pick_order(data)
            code = code_of(
                lambda: world.orders.ship_order(
                    oc.ShipOrderRequest(
                        order_id=order.order_id, carrier="DHL", tracking_number=f"TRK{secrets.token_hex(4)}"
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
            )
            if order.status == CONFIRMED:
                assert code is None, f"shipping a confirmed order failed with {code}"
                order.status = SHIPPED
            else:
                assert code == grpc.StatusCode.FAILED_PRECONDITION, f"shipping a {order.status} order: {code}"

        @rule(data=st.data(), quantity=st.integers(min_value=1, max_value=8))
        def restock(self, data: st.DataObject, quantity: int) -> None:
            product = self._pick_product(data)
            reply = world.catalog.restock_product(
                cat.RestockProductRequest(product_id=product.product_id, quantity=quantity), timeout=CALL_TIMEOUT_S
            )
            product.stock += quantity
            assert reply.stock_available == product.stock

        @rule(data=st.data(), price=st.integers(min_value=50, max_value=900))
        def change_price(self, data: st.DataObject, price: int) -> None:
            product = self._pick_product(data)
            world.catalog.update_product_price(
                cat.UpdateProductPriceRequest(
                    product_id=product.product_id, price=Money(currency_code=CURRENCY, amount_minor=price)
                ),
                timeout=CALL_TIMEOUT_S,
            )
            product.price = price

        # -- checked after every step

        @invariant()
        def postgres_matches_the_model(self) -> None:
            if not self.products:
                return
            rows = world.db.fetch(
                "SELECT id::text AS id, stock_available FROM products WHERE id = ANY($1::uuid[])", list(self.products)
            )
            stock = {row["id"]: row["stock_available"] for row in rows}
            assert all(value >= 0 for value in stock.values()), stock
            assert stock == {pid: p.stock for pid, p in self.products.items()}
            if self.orders:
                rows = world.db.fetch(
                    "SELECT id::text AS id, status FROM orders WHERE id = ANY($1::uuid[])", list(self.orders)
                )
                assert {row["id"]: row["status"] for row in rows} == {oid: o.status for oid, o in self.orders.items()}

        def teardown(self) -> None:
            world.tally["examples"] += 1
            world.tally.update(f"ended {order.status}" for order in self.orders.values() if order.status)
            try:
                # A step that failed half-way leaves an order the model never settled: its failure is the report.
                if self.products and all(order.status for order in self.orders.values()):
                    self._check_views()
                    self._check_payments()
                assert world.sampler.negatives == [], f"negative stock seen on a replica: {world.sampler.negatives}"
            finally:
                world.sampler.watch([])

        # -- helpers

        def _pick_order(self, data: st.DataObject) -> ModelOrder:
            """Any order, but a confirmed one half of the time when there is one (they have the most to lose).

            Orders end as races go, so which ones are confirmed differs between runs of the same
            example; the draws therefore have the same shape whatever the system did (Hypothesis
            replays choice sequences and insists on it).
            """
            orders = list(self.orders.values())  # in the order they were placed
            confirmed = [order for order in orders if order.status == CONFIRMED]
            prefer_confirmed = data.draw(st.booleans(), label="prefer a confirmed order")
            index = data.draw(st.integers(min_value=0, max_value=10_000), label="order index")
            pool = confirmed if confirmed and prefer_confirmed else orders
            return pool[index % len(pool)]

        def _pick_product(self, data: st.DataObject) -> ModelProduct:
            products = sorted(self.products.values(), key=lambda p: p.sku)
            return data.draw(st.sampled_from(products), label="product")

        def _place(self, data: st.DataObject) -> ModelOrder | None:
            world.tally["orders placed"] += 1
            products = sorted(self.products.values(), key=lambda p: p.sku)
            chosen = data.draw(st.lists(st.sampled_from(products), min_size=1, max_size=2, unique_by=lambda p: p.sku))
            quantities = data.draw(
                st.lists(st.integers(min_value=1, max_value=4), min_size=len(chosen), max_size=len(chosen))
            )
            reply = world.orders.place_order(
                oc.PlaceOrderRequest(
                    customer_id=self.customer_id,
                    items=[oc.OrderItem(sku=p.sku, quantity=q) for p, q in zip(chosen, quantities, strict=True)],
                    shipping_address=ADDRESS,
                ),
                timeout=CALL_TIMEOUT_S,
            )
            lines = [ModelLine(p.product_id, p.sku, q, p.price) for p, q in zip(chosen, quantities, strict=True)]
            # Prices come from the catalog, never from the caller: the reply shows the model's prices.
            assert [(line.sku, line.quantity, line.unit_price.amount_minor) for line in reply.lines] == [
                (line.sku, line.quantity, line.unit_price) for line in lines
            ]
            order = ModelOrder(reply.order_id, lines)
            self.orders[order.order_id] = order
            return order

        def _follow(self, order: ModelOrder, expected: str) -> None:
            actual = self._status_in_postgres(order.order_id)
            assert actual == expected, (
                f"order {order.order_id} (total {order.total}) is {actual}, the model says {expected}"
            )
            order.status = actual
            if actual == CONFIRMED:
                for line in order.lines:
                    self.products[line.product_id].stock -= line.quantity

        def _status_in_postgres(self, order_id: str) -> str:
            [row] = world.db.fetch("SELECT status FROM orders WHERE id = $1::uuid", order_id)
            return str(row["status"])

        def _settle(self) -> None:
            """Wait until no saga is in flight; none may be parked as failed."""

            def check() -> str | None:
                [row] = world.db.fetch(
                    "SELECT count(*) FILTER (WHERE status IN ('running', 'compensating')) AS busy, "
                    "count(*) FILTER (WHERE status = 'failed') AS failed FROM saga_executions"
                )
                assert row["failed"] == 0, "a saga was parked as failed"
                return None if row["busy"] == 0 else f"{row['busy']} sagas in flight"

            wait_for(check, SETTLE_DEADLINE_S, "no saga in flight")

        def _check_views(self) -> None:
            """Both replicas show every product and order as the model has it (after the stream drains)."""

            def product_problem() -> str | None:
                for views in world.product_views:
                    for product in self.products.values():
                        try:
                            view = views.get_product(
                                pq.GetProductRequest(product_id=product.product_id), timeout=5
                            ).product
                        except TesseraError as exc:
                            return f"GetProduct {product.sku}: {exc.code}"
                        seen = (view.sku, view.name, view.price.amount_minor, view.stock_available)
                        wanted = (product.sku, product.name, product.price, product.stock)
                        if seen != wanted:
                            return f"product view {seen} != model {wanted}"
                return None

            def order_problem() -> str | None:
                for views in world.order_views:
                    for order in self.orders.values():
                        try:
                            view = views.get_order(oq.GetOrderRequest(order_id=order.order_id), timeout=5).order
                        except TesseraError as exc:
                            return f"GetOrder {order.order_id}: {exc.code}"
                        seen_lines = [(line.sku, line.quantity, line.unit_price.amount_minor) for line in view.lines]
                        wanted_lines = [(line.sku, line.quantity, line.unit_price) for line in order.lines]
                        seen = (view.status, view.total.amount_minor, view.paid, seen_lines, view.customer_id)
                        wanted = (_VIEW_STATUS[order.status], order.total, order.paid, wanted_lines, self.customer_id)
                        if seen != wanted:
                            return f"order view {order.order_id} {seen} != model {wanted}"
                        if not view.status_history or view.status_history[-1].status != view.status:
                            return f"order {order.order_id}: history does not end in its status"
                return None

            wait_for(product_problem, DRAIN_DEADLINE_S, "product views equal to the model")
            wait_for(order_problem, DRAIN_DEADLINE_S, "order views equal to the model")

        def _check_payments(self) -> None:
            """Confirmed and shipped orders are charged exactly once; cancelled and rejected ones are not charged."""
            books = {
                p.reference: p
                for p in world.payments.ListPayments(pp.ListPaymentsRequest(), timeout=CALL_TIMEOUT_S).payments
            }
            for order in self.orders.values():
                payment = books.get(order.order_id)
                if order.status in (CONFIRMED, SHIPPED):
                    assert payment is not None, f"{order.status} order {order.order_id} has no payment"
                    assert (payment.state, payment.captures, payment.refunds) == (pp.PAYMENT_STATE_CAPTURED, 1, 0)
                    assert payment.amount == Money(currency_code=CURRENCY, amount_minor=order.total)
                elif payment is not None:
                    # Refunded, or never charged.
                    charged = (payment.captures, payment.refunds)
                    assert charged in ((0, 0), (1, 1)), f"{order.status} order {order.order_id}: {payment}"
                    if charged == (1, 1):
                        assert payment.state == pp.PAYMENT_STATE_REFUNDED
                    else:
                        assert payment.state in (
                            pp.PAYMENT_STATE_VOIDED,
                            pp.PAYMENT_STATE_DECLINED,
                        ), f"{order.status} order {order.order_id}: {payment}"

    return OrderMachine


# --- the tests ----------------------------------------------------------------------------

# The saga worker gives up on a provider call quickly and retries soon, so that injected
# timeouts and outages cost little time; attempts are generous, so a run of bad luck never parks a saga.
SAGA_ENV = {
    "PAYMENT_PROVIDER_TIMEOUT_S": "0.5",
    "SAGA_BACKOFF_BASE_MS": "20",
    "SAGA_BACKOFF_CAP_MS": "200",
    "SAGA_MAX_ATTEMPTS": "25",
    "SAGA_BREAKER_COOLDOWN_S": "0.3",
}


@pytest.fixture(scope="module")
async def stack(e2e_database: str, redis_server_url: str, e2e_prefix: str, e2e_logs: Path) -> AsyncIterator[Stack]:
    """The e2e stack (no authentication), its saga worker tuned by SAGA_ENV."""
    config = e2e_config(e2e_database, redis_server_url, e2e_prefix, e2e_logs, saga_env=SAGA_ENV)
    async with running_stack(config, redis_server_url) as running:
        yield running


@pytest.fixture(scope="module")
def world(stack: Stack, e2e_database: str) -> Iterator[World]:
    assert stack.saga_workers, "the stack runs no saga worker"
    write = SyncTesseraClient(stack.write_address, None, session=False)
    readers = [SyncTesseraClient(stack.write_address, [address], session=False) for address in stack.read_addresses]
    provider = grpc.insecure_channel(stack.provider_address)
    sampler = StockSampler(stack.write_address, stack.read_addresses[0])
    sampler.start()
    db = Postgres(e2e_database)
    try:
        yield World(
            stack=stack,
            db=db,
            users=write.users,
            catalog=write.catalog,
            orders=write.orders,
            product_views=[reader.catalog for reader in readers],
            order_views=[reader.orders for reader in readers],
            payments=pp_grpc.PaymentProviderServiceStub(provider),
            provider_admin=admin_grpc.PaymentProviderAdminServiceStub(provider),
            sampler=sampler,
        )
    finally:
        sampler.stop()
        db.close()
        provider.close()
        for client in (write, *readers):
            client.close()


def configure_provider(world: World, **failures: Any) -> None:
    """Put the provider's failures in force: the decline limit the model knows, plus `failures`."""
    configuration = admin_pb.FailureConfiguration(decline_above_minor=DECLINE_ABOVE_MINOR, **failures)
    world.provider_admin.Configure(admin_pb.ConfigureRequest(configuration=configuration), timeout=CALL_TIMEOUT_S)


def provider_counters(world: World) -> Counter[str]:
    """The provider's call counters, as 'Method outcome' -> count."""
    reply = world.provider_admin.GetCounters(admin_pb.GetCountersRequest(), timeout=CALL_TIMEOUT_S)
    return Counter({f"{c.method} {c.outcome}": c.count for c in reply.counters})


def run_examples(world: World, examples: int, steps: int) -> float:
    """Run the state machine; return how long it took."""
    world.tally.clear()
    samples_before = world.sampler.samples
    started = time.monotonic()
    run_state_machine_as_test(
        machine_for(world),
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
        ),
    )
    elapsed = time.monotonic() - started
    # The checks really ran: a check that never ran would prove nothing.
    assert world.sampler.samples > samples_before
    assert world.sampler.negatives == []
    print(
        f"\n{world.tally['examples']} examples in {elapsed:.1f}s, {world.sampler.samples - samples_before} "
        f"stock samples; {dict(sorted(world.tally.items()))}"
    )
    return elapsed


@pytest.mark.timeout(600)
def test_random_order_histories_match_the_model(world: World) -> None:
    configure_provider(world)
    run_examples(world, EXAMPLES, STEPS)
    for ending in (CONFIRMED, SHIPPED, CANCELLED, REJECTED):
        assert world.tally[f"ended {ending}"] > 0, world.tally


@pytest.mark.timeout(600)
def test_with_an_unreliable_provider_every_payment_still_balances(world: World) -> None:
    """Outages and timeouts (with and without effect) only delay sagas: the same model holds."""
    before = provider_counters(world)
    configure_provider(
        world,
        unavailable_rate=0.15,
        timeout_rate=0.1,
        timeout_effect=admin_pb.TIMEOUT_EFFECT_RANDOM,
        seed=20_261_122,
    )
    try:
        run_examples(world, FAULTY_EXAMPLES, FAULTY_STEPS)
    finally:
        configure_provider(world)
    injected = provider_counters(world) - before
    print(f"provider calls during the run: {dict(sorted(injected.items()))}")
    assert world.tally[f"ended {CONFIRMED}"] > 0, world.tally
    # The failures really happened, and retries after them were answered from the idempotency records.
    assert sum(count for key, count in injected.items() if key.endswith(" unavailable")) > 0
    assert sum(count for key, count in injected.items() if key.endswith(" timeout")) > 0
    assert sum(count for key, count in injected.items() if key.endswith(" replayed")) > 0
