"""Builders of catalog and order events with consistent aggregate versions, and an in-memory view store.

`Events` returns NewEvent values (what the write side appends to the outbox); `envelope()`
positions one as the relay would. `MemoryViews` applies a projection's ops with the apply
script's rule (only at checkpoint + 1), so unit tests can deliver every event twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from google.protobuf.message import Message

from read_service.projections.base import Effect, Projection
from read_service.search import entity_of
from shared_kernel.contracts.event_log import NewEvent
from tessera.catalog.v1.events_pb2 import (
    ProductAdded,
    ProductDiscontinued,
    ProductPriceUpdated,
    ProductRestocked,
    StockReleased,
    StockReserved,
)
from tessera.common.v1.money_pb2 import Money
from tessera.events.v1.envelope_pb2 import EventEnvelope
from tessera.orders.v1.events_pb2 import (
    OrderCancelled,
    OrderConfirmed,
    OrderItemAdded,
    OrderPlaced,
    OrderRejected,
    OrderShipped,
    PaymentAuthorized,
    PaymentCaptured,
    PaymentDeclined,
    PaymentRefunded,
    PaymentVoided,
    StockReservationFailed,
)
from tessera.orders.v1.order_pb2 import Address, OrderLine, OrderStatus

BASE_TIME = datetime(2024, 3, 10, 9, 0, tzinfo=UTC)


def eur(amount: int, currency: str = "EUR") -> Money:
    """An amount in minor units."""
    return Money(currency_code=currency, amount_minor=amount)


@dataclass
class Product:
    """What the factory remembers of a product."""

    product_id: str
    sku: str
    name: str
    price: Money
    stock: int


@dataclass
class Events:
    """Builds events the way the write side and the saga emit them."""

    clock: datetime = BASE_TIME
    versions: dict[str, int] = field(default_factory=dict)
    products: dict[str, Product] = field(default_factory=dict)
    lines: dict[str, list[OrderLine]] = field(default_factory=dict)
    totals: dict[str, Money] = field(default_factory=dict)

    def tick(self, minutes: int = 1) -> datetime:
        """Advance the clock and return it."""
        self.clock += timedelta(minutes=minutes)
        return self.clock

    def at(self, when: datetime) -> None:
        """Set the clock (the next event happens one minute after `when`)."""
        self.clock = when - timedelta(minutes=1)

    def _next(self, aggregate_id: str) -> int:
        self.versions[aggregate_id] = self.versions.get(aggregate_id, 0) + 1
        return self.versions[aggregate_id]

    def _event(self, payload: Message, aggregate_type: str, aggregate_id: str, when: datetime) -> NewEvent:
        return NewEvent(payload, aggregate_type, aggregate_id, self._next(aggregate_id), when)

    # -- catalog ------------------------------------------------------------------------------------

    def add_product(self, sku: str, name: str, price: int, stock: int, currency: str = "EUR") -> tuple[str, NewEvent]:
        """ProductAdded for a new product id (returned too)."""
        product_id = str(uuid.uuid4())
        when = self.tick()
        self.products[product_id] = Product(product_id, sku, name, eur(price, currency), stock)
        payload = ProductAdded(
            product_id=product_id, sku=sku, name=name, price=eur(price, currency), stock_available=stock
        )
        payload.added_at.FromDatetime(when)
        return product_id, self._event(payload, "product", product_id, when)

    def reprice(self, product_id: str, price: int) -> NewEvent:
        """ProductPriceUpdated."""
        product = self.products[product_id]
        product.price = eur(price, product.price.currency_code)
        when = self.tick()
        payload = ProductPriceUpdated(product_id=product_id, sku=product.sku, price=product.price)
        payload.updated_at.FromDatetime(when)
        return self._event(payload, "product", product_id, when)

    def restock(self, product_id: str, quantity: int) -> NewEvent:
        """ProductRestocked."""
        product = self.products[product_id]
        product.stock += quantity
        when = self.tick()
        payload = ProductRestocked(
            product_id=product_id, sku=product.sku, quantity=quantity, stock_available=product.stock
        )
        payload.restocked_at.FromDatetime(when)
        return self._event(payload, "product", product_id, when)

    def discontinue(self, product_id: str, reason: str = "end of line") -> NewEvent:
        """ProductDiscontinued."""
        when = self.tick()
        payload = ProductDiscontinued(product_id=product_id, sku=self.products[product_id].sku, reason=reason)
        payload.discontinued_at.FromDatetime(when)
        return self._event(payload, "product", product_id, when)

    def reserve(self, order_id: str) -> list[NewEvent]:
        """One StockReserved per line of the order, on the products."""
        events = []
        for line in self.lines[order_id]:
            product = self.products[line.product_id]
            product.stock -= line.quantity
            when = self.tick()
            payload = StockReserved(
                product_id=product.product_id,
                sku=product.sku,
                order_id=order_id,
                quantity=line.quantity,
                stock_available=product.stock,
            )
            payload.reserved_at.FromDatetime(when)
            events.append(self._event(payload, "product", product.product_id, when))
        return events

    def release(self, order_id: str) -> list[NewEvent]:
        """One StockReleased per line of the order, on the products."""
        events = []
        for line in self.lines[order_id]:
            product = self.products[line.product_id]
            product.stock += line.quantity
            when = self.tick()
            payload = StockReleased(
                product_id=product.product_id,
                sku=product.sku,
                order_id=order_id,
                quantity=line.quantity,
                stock_available=product.stock,
            )
            payload.released_at.FromDatetime(when)
            events.append(self._event(payload, "product", product.product_id, when))
        return events

    # -- orders ---------------------------------------------------------------------------------------

    def _line(self, product_id: str, quantity: int) -> OrderLine:
        product = self.products[product_id]
        return OrderLine(
            product_id=product_id,
            sku=product.sku,
            product_name=product.name,
            unit_price=product.price,
            quantity=quantity,
            line_total=eur(product.price.amount_minor * quantity, product.price.currency_code),
        )

    def _total(self, order_id: str) -> Money:
        lines = self.lines[order_id]
        return eur(sum(line.line_total.amount_minor for line in lines), lines[0].line_total.currency_code)

    def place(
        self,
        customer_id: str,
        items: Sequence[tuple[str, int]],
        name: str = "Ada Lovelace",
        email: str = "ada@example.com",
        when: datetime | None = None,
    ) -> tuple[str, NewEvent]:
        """OrderPlaced for a new order id (returned too); items are (product id, quantity)."""
        order_id = str(uuid.uuid4())
        when = when or self.tick()
        self.lines[order_id] = [self._line(pid, qty) for pid, qty in items]
        total = self._total(order_id)
        payload = OrderPlaced(
            order_id=order_id,
            customer_id=customer_id,
            customer_name=name,
            customer_email=email,
            lines=self.lines[order_id],
            total=total,
            shipping_address=Address(
                recipient=name, line1="1 Analytical Way", city="London", postal_code="N1 7AA", country_code="GB"
            ),
            notes="leave at the door",
        )
        payload.placed_at.FromDatetime(when)
        return order_id, self._event(payload, "order", order_id, when)

    def add_item(self, order_id: str, product_id: str, quantity: int) -> NewEvent:
        """OrderItemAdded (a product already in the order gets its quantity raised)."""
        lines = self.lines[order_id]
        for index, line in enumerate(lines):
            if line.product_id == product_id:
                lines[index] = self._line(product_id, line.quantity + quantity)
                new_line = lines[index]
                break
        else:
            new_line = self._line(product_id, quantity)
            lines.append(new_line)
        when = self.tick()
        payload = OrderItemAdded(order_id=order_id, line=new_line, total=self._total(order_id))
        payload.added_at.FromDatetime(when)
        return self._event(payload, "order", order_id, when)

    def reservation_failed(self, order_id: str, reason: str = "not enough stock of ABC-1") -> list[NewEvent]:
        """StockReservationFailed then OrderRejected."""
        when = self.tick()
        failed = StockReservationFailed(order_id=order_id, reason=reason)
        failed.failed_at.FromDatetime(when)
        rejected = OrderRejected(order_id=order_id, reason=reason)
        rejected.rejected_at.FromDatetime(when)
        return [self._event(failed, "order", order_id, when), self._event(rejected, "order", order_id, when)]

    def authorize(self, order_id: str) -> NewEvent:
        """PaymentAuthorized for the order's total."""
        when = self.tick()
        payload = PaymentAuthorized(
            order_id=order_id, authorization_id=f"auth-{order_id[:8]}", amount=self._total(order_id)
        )
        payload.authorized_at.FromDatetime(when)
        return self._event(payload, "order", order_id, when)

    def decline(self, order_id: str, reason: str = "insufficient funds") -> NewEvent:
        """PaymentDeclined."""
        when = self.tick()
        payload = PaymentDeclined(order_id=order_id, reason=reason)
        payload.declined_at.FromDatetime(when)
        return self._event(payload, "order", order_id, when)

    def capture(self, order_id: str) -> NewEvent:
        """PaymentCaptured for the order's total."""
        when = self.tick()
        payload = PaymentCaptured(
            order_id=order_id, authorization_id=f"auth-{order_id[:8]}", amount=self._total(order_id)
        )
        payload.captured_at.FromDatetime(when)
        return self._event(payload, "order", order_id, when)

    def confirm(self, order_id: str) -> NewEvent:
        """OrderConfirmed."""
        when = self.tick()
        payload = OrderConfirmed(order_id=order_id, total=self._total(order_id))
        payload.confirmed_at.FromDatetime(when)
        return self._event(payload, "order", order_id, when)

    def void(self, order_id: str) -> NewEvent:
        """PaymentVoided."""
        when = self.tick()
        payload = PaymentVoided(order_id=order_id, authorization_id=f"auth-{order_id[:8]}")
        payload.voided_at.FromDatetime(when)
        return self._event(payload, "order", order_id, when)

    def refund(self, order_id: str) -> NewEvent:
        """PaymentRefunded of the order's total."""
        when = self.tick()
        payload = PaymentRefunded(order_id=order_id, refund_id=f"refund-{order_id[:8]}", amount=self._total(order_id))
        payload.refunded_at.FromDatetime(when)
        return self._event(payload, "order", order_id, when)

    def cancel(
        self,
        order_id: str,
        previous: OrderStatus.ValueType,
        reason: str = "changed my mind",
        by: str = "alice",
    ) -> NewEvent:
        """OrderCancelled."""
        when = self.tick()
        payload = OrderCancelled(order_id=order_id, reason=reason, cancelled_by=by, previous_status=previous)
        payload.cancelled_at.FromDatetime(when)
        return self._event(payload, "order", order_id, when)

    def ship(self, order_id: str, carrier: str = "DHL", tracking: str = "JD0123") -> NewEvent:
        """OrderShipped."""
        when = self.tick()
        payload = OrderShipped(order_id=order_id, carrier=carrier, tracking_number=tracking)
        payload.shipped_at.FromDatetime(when)
        return self._event(payload, "order", order_id, when)

    def happy_path(self, order_id: str) -> list[NewEvent]:
        """Reserve, authorize, capture, confirm."""
        return [*self.reserve(order_id), self.authorize(order_id), self.capture(order_id), self.confirm(order_id)]


def envelope(event: NewEvent, position: int) -> EventEnvelope:
    """The envelope the relay would publish for `event` at `position`."""
    env = EventEnvelope(
        event_id=str(event.event_id),
        event_type=event.event_type,
        schema_version=event.schema_version,
        aggregate_type=event.aggregate_type,
        aggregate_id=event.aggregate_id,
        aggregate_version=event.aggregate_version,
        position=position,
        payload=event.payload.SerializeToString(),
    )
    env.occurred_at.FromDatetime(event.occurred_at)
    return env


@dataclass
class MemoryViews:
    """Redis data types in memory, written only through projection effects at checkpoint + 1."""

    projection: Projection
    strings: dict[str, bytes] = field(default_factory=dict)
    hashes: dict[str, dict[str, bytes | int]] = field(default_factory=dict)
    zsets: dict[str, set[bytes]] = field(default_factory=dict)
    ranks: dict[str, dict[str, int]] = field(default_factory=dict)
    checkpoint: int = 0
    duplicates: int = 0

    def deliver(self, env: EventEnvelope) -> Effect | None:
        """Apply `env` if it is the next position; None (and nothing changes) for a duplicate."""
        if env.position <= self.checkpoint:
            self.duplicates += 1
            return None
        assert env.position == self.checkpoint + 1, "gap"
        state = {key: self.strings.get(key) for key in self.projection.state_keys(env)}
        effect = self.projection.project(env, state)
        for op in effect.ops:
            self._run(op)
        for key, value in effect.state.items():
            assert self.strings.get(key) == value, f"effect state of {key} differs from what the ops wrote"
        self.checkpoint = env.position
        return effect

    def play(self, events: Sequence[NewEvent], twice: bool = True) -> None:
        """Deliver events in order, each twice by default (as a relay re-publish would)."""
        for event in events:
            env = envelope(event, self.checkpoint + 1)
            self.deliver(env)
            if twice:
                assert self.deliver(env) is None

    def hash(self, key: str) -> dict[str, int | bytes]:
        """A hash with integer-looking values as ints."""
        return dict(self.hashes.get(key, {}))

    def _run(self, op: tuple[str | bytes | int, ...]) -> None:
        name, *args = op
        if name == "SET":
            key, value = args
            assert isinstance(key, str) and isinstance(value, bytes)
            self.strings[key] = value
        elif name == "DEL":
            for key in args:
                assert isinstance(key, str)
                self.strings.pop(key, None)
        elif name == "HSET":
            key, fld, value = args
            assert isinstance(key, str) and isinstance(fld, str)
            self.hashes.setdefault(key, {})[fld] = value if isinstance(value, bytes) else str(value).encode()
        elif name == "HINCRBY":
            key, fld, amount = args
            assert isinstance(key, str) and isinstance(fld, str) and isinstance(amount, int)
            current = self.hashes.setdefault(key, {}).get(fld, 0)
            assert isinstance(current, int)
            self.hashes[key][fld] = current + amount
        elif name == "ZADD" and ":tri:" in str(args[0]):
            key, score, member = args  # a trigram set of the search index: an id (16 bytes) scored by its rank
            assert isinstance(key, str) and isinstance(member, bytes) and isinstance(score, int) and score >= 0
            self.ranks.setdefault(key, {})[entity_of(member)] = score
        elif name == "ZREM" and ":tri:" in str(args[0]):
            key, member = args
            assert isinstance(key, str) and isinstance(member, bytes)
            found = self.ranks.get(key, {})
            found.pop(entity_of(member), None)
            if not found:
                self.ranks.pop(key, None)  # as Redis drops an empty sorted set
        elif name == "ZADD":
            key, score, member = args
            assert isinstance(key, str) and score == 0 and isinstance(member, bytes)
            self.zsets.setdefault(key, set()).add(member)
        elif name == "ZREM":
            key, member = args
            assert isinstance(key, str) and isinstance(member, bytes)
            self.zsets.get(key, set()).discard(member)
        else:
            raise AssertionError(f"unexpected op {name!r}")
