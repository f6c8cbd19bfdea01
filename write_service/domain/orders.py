"""The Order aggregate: what a customer ordered, at which prices, and where it stands.

Rules:
- an order is placed by an active customer, with 1 to MAX_LINES lines of products that
  exist and are not discontinued, all priced in one currency; prices come from the
  catalog when a line is added, never from the caller, and totals are exact integers;
- a line holds 1 to MAX_QUANTITY units; adding a sku the order already holds raises
  that line's quantity;
- items are added only while the order is pending (its saga has not reserved stock);
- an order can be cancelled until it ships (pending, reserved or confirmed); a shipped,
  cancelled or rejected order cannot;
- only a confirmed order ships;
- the saga reserves a pending order's stock all or nothing: every line's product still
  sold and in stock, or the order is rejected naming each shortage; a reserved order's
  payment is authorized, then captured, which confirms it;
- reserved units go back to stock exactly once (`release_stock`), whatever ends the order.

The saga worker drives these transitions (write_service.saga); this aggregate decides them
and builds their events, for the saga and the command handlers alike.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar, Literal

from shared_kernel.contracts.errors import FailedPrecondition
from tessera.orders.v1 import events_pb2, order_pb2
from write_service.domain.aggregate import Aggregate, timestamp
from write_service.domain.catalog import Product
from write_service.domain.money import money

ORDER_AGGREGATE = "order"
MAX_LINES = 100
MAX_QUANTITY = 10_000

OrderStatus = Literal["pending", "reserved", "confirmed", "shipped", "cancelled", "rejected"]

STATUS_TO_PROTO: dict[str, order_pb2.OrderStatus.ValueType] = {
    "pending": order_pb2.ORDER_STATUS_PENDING,
    "reserved": order_pb2.ORDER_STATUS_RESERVED,
    "confirmed": order_pb2.ORDER_STATUS_CONFIRMED,
    "shipped": order_pb2.ORDER_STATUS_SHIPPED,
    "cancelled": order_pb2.ORDER_STATUS_CANCELLED,
    "rejected": order_pb2.ORDER_STATUS_REJECTED,
}

_CANCELLABLE = frozenset({"pending", "reserved", "confirmed"})
# Placed, but its payment not captured yet.
AWAITING_PAYMENT: tuple[OrderStatus, ...] = ("pending", "reserved")

# Who cancels an order the saga gives up on (a declined payment, a failed capture, a policy).
SYSTEM = "system"


def shortage_reason(shortages: Sequence[tuple[str, int, int]], discontinued: Sequence[str]) -> str:
    """The rejection reason naming every sku that could not be reserved."""
    parts = [f"sku {sku} (requested {wanted}, available {available})" for sku, wanted, available in shortages]
    text = f"insufficient stock for {', '.join(parts)}" if parts else ""
    if discontinued:
        gone = f"discontinued product{'s' if len(discontinued) > 1 else ''}: {', '.join(discontinued)}"
        text = f"{text}; {gone}" if text else gone
    return text


@dataclass(frozen=True, slots=True)
class Address:
    """A postal shipping address (already validated by the command)."""

    recipient: str
    line1: str
    line2: str
    city: str
    postal_code: str
    country_code: str

    def to_proto(self) -> order_pb2.Address:
        """The protobuf Address."""
        return order_pb2.Address(
            recipient=self.recipient,
            line1=self.line1,
            line2=self.line2,
            city=self.city,
            postal_code=self.postal_code,
            country_code=self.country_code,
        )


@dataclass(frozen=True, slots=True)
class Customer:
    """The facts about a customer an order needs: whether it may order, and its name and e-mail now."""

    id: uuid.UUID
    full_name: str
    email: str
    active: bool

    def require_active(self) -> None:
        """Refuse a customer whose account is deactivated."""
        if not self.active:
            raise FailedPrecondition(f"customer {self.id} must be an active user to place an order")


@dataclass(slots=True)
class OrderLine:
    """One product of an order, priced when it was added."""

    line_no: int
    product_id: uuid.UUID
    sku: str
    product_name: str
    unit_price_minor: int
    quantity: int

    @property
    def total_minor(self) -> int:
        """Unit price times quantity."""
        return self.unit_price_minor * self.quantity

    def to_proto(self, currency_code: str) -> order_pb2.OrderLine:
        """The protobuf OrderLine."""
        return order_pb2.OrderLine(
            product_id=str(self.product_id),
            sku=self.sku,
            product_name=self.product_name,
            unit_price=money(currency_code, self.unit_price_minor),
            quantity=self.quantity,
            line_total=money(currency_code, self.total_minor),
        )


@dataclass(eq=False, kw_only=True)
class Order(Aggregate):
    """An order as the write side knows it."""

    aggregate_type: ClassVar[str] = ORDER_AGGREGATE

    customer_id: uuid.UUID
    status: OrderStatus
    currency_code: str
    lines: list[OrderLine] = field(default_factory=list)
    shipping_address: Address
    notes: str = ""
    reason: str = ""
    cancelled_by: str = ""
    carrier: str = ""
    tracking_number: str = ""
    placed_at: datetime
    # Units the saga took out of stock and has not returned yet, by product.
    reservations: dict[uuid.UUID, int] = field(default_factory=dict)

    @property
    def total_minor(self) -> int:
        """Sum of the line totals."""
        return sum(line.total_minor for line in self.lines)

    @classmethod
    def place(
        cls,
        *,
        order_id: uuid.UUID,
        customer: Customer,
        items: Sequence[tuple[Product, int]],
        shipping_address: Address,
        notes: str,
        now: datetime,
    ) -> Order:
        """Create a pending order at version 1, priced from `items`' products, and record OrderPlaced."""
        customer.require_active()
        if not items:
            raise FailedPrecondition("an order needs at least one item")
        if len(items) > MAX_LINES:
            raise FailedPrecondition(f"an order holds at most {MAX_LINES} items")
        currency_code = items[0][0].currency_code
        order = cls(
            id=order_id,
            customer_id=customer.id,
            status="pending",
            currency_code=currency_code,
            shipping_address=shipping_address,
            notes=notes,
            version=0,
            placed_at=now,
            updated_at=now,
        )
        for product, quantity in items:
            order._check_product(product)
            order.lines.append(order._new_line(product, quantity))
        order._record(
            events_pb2.OrderPlaced(
                order_id=str(order_id),
                customer_id=str(customer.id),
                customer_name=customer.full_name,
                customer_email=customer.email,
                lines=[line.to_proto(currency_code) for line in order.lines],
                total=money(currency_code, order.total_minor),
                shipping_address=shipping_address.to_proto(),
                notes=notes,
                placed_at=timestamp(now),
            ),
            now,
        )
        return order

    def add_item(self, *, product: Product, quantity: int, now: datetime) -> OrderLine:
        """Add units of a product (a new line, or more of a line it has) and record OrderItemAdded."""
        if self.status != "pending":
            raise FailedPrecondition(
                f"items can only be added while the order is pending; order {self.id} is {self.status}"
            )
        self._check_product(product)
        line = next((line for line in self.lines if line.product_id == product.id), None)
        if line is None:
            if len(self.lines) >= MAX_LINES:
                raise FailedPrecondition(f"an order holds at most {MAX_LINES} items")
            line = self._new_line(product, quantity)
            self.lines.append(line)
        elif line.quantity + quantity > MAX_QUANTITY:
            raise FailedPrecondition(
                f"an order line holds at most {MAX_QUANTITY} units: sku {line.sku!r} already has {line.quantity}"
            )
        else:
            # The line keeps the price it was placed at; only the quantity grows.
            line.quantity += quantity
        self._record(
            events_pb2.OrderItemAdded(
                order_id=str(self.id),
                line=line.to_proto(self.currency_code),
                total=money(self.currency_code, self.total_minor),
                added_at=timestamp(now),
            ),
            now,
        )
        return line

    @property
    def is_cancellable(self) -> bool:
        """Whether the order can still be cancelled: it has not shipped and has not ended otherwise."""
        return self.status in _CANCELLABLE

    def units_by_product(self) -> dict[uuid.UUID, int]:
        """The units each product of the order's lines is ordered in."""
        units: dict[uuid.UUID, int] = {}
        for line in self.lines:
            units[line.product_id] = units.get(line.product_id, 0) + line.quantity
        return units

    def reserve_stock(self, products: Mapping[uuid.UUID, Product], *, now: datetime) -> str:
        """Reserve every line's units of `products`, or reject the order; "" when reserved, else the reason.

        All or nothing: a missing or discontinued product or a shortage on any line rejects
        the order (StockReservationFailed, OrderRejected) and reserves nothing; otherwise each
        product records its StockReserved and the order becomes reserved. That status change
        records no order event (the StockReserved events carry the order id), so the order's
        version stays the number of its events.
        """
        if self.status != "pending":
            raise FailedPrecondition(f"only a pending order can reserve stock; order {self.id} is {self.status}")
        wanted = self.units_by_product()
        sku_of = {line.product_id: line.sku for line in self.lines}
        shortages = [
            (sku_of[pid], units, products[pid].stock_available if pid in products else 0)
            for pid, units in wanted.items()
            if pid not in products or units > products[pid].stock_available
        ]
        discontinued = [sku_of[pid] for pid in wanted if pid in products and products[pid].discontinued]
        if shortages or discontinued or not wanted:
            reason = shortage_reason(shortages, discontinued) or "the order has no items"
            self._record(
                events_pb2.StockReservationFailed(
                    order_id=str(self.id),
                    reason=reason,
                    shortages=[
                        events_pb2.StockShortage(sku=sku, requested=units, available=available)
                        for sku, units, available in shortages
                    ],
                    failed_at=timestamp(now),
                ),
                now,
            )
            self._record(
                events_pb2.OrderRejected(order_id=str(self.id), reason=reason, rejected_at=timestamp(now)), now
            )
            self.status = "rejected"
            self.reason = reason
            return reason
        for pid in sorted(wanted):
            products[pid].reserve(order_id=self.id, quantity=wanted[pid], now=now)
        self.reservations = dict(wanted)
        self.status = "reserved"
        self.updated_at = now
        return ""

    def release_stock(self, products: Mapping[uuid.UUID, Product], *, now: datetime) -> tuple[int, int]:
        """Return every unit still reserved to its product (one StockReleased each); (units, products)."""
        released = sorted(self.reservations.items())
        for pid, units in released:
            products[pid].release(order_id=self.id, quantity=units, now=now)
        self.reservations = {}
        return sum(units for _, units in released), len(released)

    def authorize_payment(self, *, authorization_id: str, now: datetime) -> None:
        """Record PaymentAuthorized for the order's total; only a reserved order is paid for."""
        self._require_reserved("authorized")
        self._record(
            events_pb2.PaymentAuthorized(
                order_id=str(self.id),
                authorization_id=authorization_id,
                amount=money(self.currency_code, self.total_minor),
                authorized_at=timestamp(now),
            ),
            now,
        )

    def decline_payment(self, *, reason: str, now: datetime) -> None:
        """Record PaymentDeclined; the saga then releases the stock and cancels the order."""
        self._require_reserved("declined")
        self._record(events_pb2.PaymentDeclined(order_id=str(self.id), reason=reason, declined_at=timestamp(now)), now)

    def confirm(self, *, authorization_id: str, now: datetime) -> None:
        """Record the capture of the order's total (PaymentCaptured) and confirm it (OrderConfirmed)."""
        self._require_reserved("captured")
        total = money(self.currency_code, self.total_minor)
        self._record(
            events_pb2.PaymentCaptured(
                order_id=str(self.id), authorization_id=authorization_id, amount=total, captured_at=timestamp(now)
            ),
            now,
        )
        self._record(events_pb2.OrderConfirmed(order_id=str(self.id), total=total, confirmed_at=timestamp(now)), now)
        self.status = "confirmed"

    def record_void(self, *, authorization_id: str, now: datetime) -> None:
        """Record PaymentVoided: the authorization was released at the provider."""
        self._record(
            events_pb2.PaymentVoided(
                order_id=str(self.id), authorization_id=authorization_id, voided_at=timestamp(now)
            ),
            now,
        )

    def record_refund(self, *, refund_id: str, currency_code: str, amount_minor: int, now: datetime) -> None:
        """Record PaymentRefunded: the captured amount went back to the customer."""
        self._record(
            events_pb2.PaymentRefunded(
                order_id=str(self.id),
                refund_id=refund_id,
                amount=money(currency_code, amount_minor),
                refunded_at=timestamp(now),
            ),
            now,
        )

    def cancel_by_system(self, *, reason: str, now: datetime) -> bool:
        """Cancel as the system (the saga, a policy) unless the order already ended; whether it did."""
        if not self.is_cancellable:
            return False
        self.cancel(reason=reason, cancelled_by=SYSTEM, now=now)
        return True

    def cancel(self, *, reason: str, cancelled_by: str, now: datetime) -> OrderStatus:
        """Cancel an order that has not shipped, record OrderCancelled, and return the status it had."""
        previous = self.status
        if previous == "shipped":
            raise FailedPrecondition("a shipped order cannot be cancelled")
        if previous not in _CANCELLABLE:
            raise FailedPrecondition(f"order {self.id} is already {previous} and cannot be cancelled")
        self.status = "cancelled"
        self.reason = reason
        self.cancelled_by = cancelled_by
        self._record(
            events_pb2.OrderCancelled(
                order_id=str(self.id),
                reason=reason,
                cancelled_by=cancelled_by,
                previous_status=STATUS_TO_PROTO[previous],
                cancelled_at=timestamp(now),
            ),
            now,
        )
        return previous

    def ship(self, *, carrier: str, tracking_number: str, now: datetime) -> None:
        """Hand a confirmed order to a carrier and record OrderShipped."""
        if self.status != "confirmed":
            raise FailedPrecondition(f"only a confirmed order can be shipped; order {self.id} is {self.status}")
        self.status = "shipped"
        self.carrier = carrier
        self.tracking_number = tracking_number
        self._record(
            events_pb2.OrderShipped(
                order_id=str(self.id), carrier=carrier, tracking_number=tracking_number, shipped_at=timestamp(now)
            ),
            now,
        )

    def _require_reserved(self, what: str) -> None:
        if self.status != "reserved":
            raise FailedPrecondition(f"only a reserved order's payment is {what}; order {self.id} is {self.status}")

    def _check_product(self, product: Product) -> None:
        product.require_orderable()
        if product.currency_code != self.currency_code:
            raise FailedPrecondition(
                f"all items of an order must share one currency: sku {product.sku!r} is priced in "
                f"{product.currency_code}, the order in {self.currency_code}"
            )

    def _new_line(self, product: Product, quantity: int) -> OrderLine:
        return OrderLine(
            line_no=max((line.line_no for line in self.lines), default=0) + 1,
            product_id=product.id,
            sku=product.sku,
            product_name=product.name,
            unit_price_minor=product.price_minor,
            quantity=quantity,
        )
