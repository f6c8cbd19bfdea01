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
- only a confirmed order ships.

Status changes made by the saga (reserved, confirmed, rejected, cancelled after a failed
payment) are written by the saga worker, not by this aggregate.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar, Literal

from shared_kernel.errors import FailedPrecondition
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
