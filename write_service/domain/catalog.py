"""The Product aggregate: a catalog entry with its price and the units available for sale.

Rules:
- the sku is unique case-insensitively (checked by the handler, and by the unique index on
  lower(sku) for the race between two commands);
- a price change keeps the product's currency: orders in flight and the read side's
  figures are per currency, and a product silently changing currency would mix them;
- a discontinued product can no longer be repriced, restocked or ordered, and is
  discontinued at most once;
- stock never goes negative (an order's saga reserves only what is there and only of a
  product still sold; the table's CHECK backs it up) and never exceeds STOCK_MAX;
- units an order reserved come back to stock when the order releases them, whether the
  product is still sold or not.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar

from shared_kernel.contracts.errors import AlreadyExists, FailedPrecondition
from tessera.catalog.v1 import events_pb2
from write_service.domain.aggregate import Aggregate, timestamp
from write_service.domain.money import money

PRODUCT_AGGREGATE = "product"

# Most units one product may hold in stock: far beyond any real warehouse, far below 2^63.
STOCK_MAX = 10**15


def sku_taken() -> AlreadyExists:
    """The error for a sku another product already has."""
    return AlreadyExists("sku is already in the catalog", field="sku")


@dataclass(eq=False, kw_only=True)
class Product(Aggregate):
    """A product as the write side knows it."""

    aggregate_type: ClassVar[str] = PRODUCT_AGGREGATE

    sku: str
    name: str
    currency_code: str
    price_minor: int
    stock_available: int
    discontinued: bool = False
    discontinued_reason: str = ""
    created_at: datetime

    @classmethod
    def add(
        cls,
        *,
        product_id: uuid.UUID,
        sku: str,
        name: str,
        currency_code: str,
        price_minor: int,
        initial_stock: int,
        now: datetime,
    ) -> Product:
        """Create a product at version 1 and record ProductAdded."""
        product = cls(
            id=product_id,
            sku=sku,
            name=name,
            currency_code=currency_code,
            price_minor=price_minor,
            stock_available=initial_stock,
            version=0,
            created_at=now,
            updated_at=now,
        )
        product._record(
            events_pb2.ProductAdded(
                product_id=str(product_id),
                sku=sku,
                name=name,
                price=money(currency_code, price_minor),
                stock_available=initial_stock,
                added_at=timestamp(now),
            ),
            now,
        )
        return product

    def require_orderable(self) -> None:
        """Refuse a product that is discontinued."""
        if self.discontinued:
            raise FailedPrecondition(f"product {self.sku!r} is discontinued and can no longer be ordered")

    def update_price(self, *, currency_code: str, price_minor: int, now: datetime) -> None:
        """Set a new unit price in the product's own currency and record ProductPriceUpdated."""
        self._require_active("repriced")
        if currency_code != self.currency_code:
            raise FailedPrecondition(
                f"a price change must keep the product's currency: product {self.sku!r} is priced in "
                f"{self.currency_code}, not {currency_code}"
            )
        self.price_minor = price_minor
        self._record(
            events_pb2.ProductPriceUpdated(
                product_id=str(self.id),
                sku=self.sku,
                price=money(currency_code, price_minor),
                updated_at=timestamp(now),
            ),
            now,
        )

    def restock(self, *, quantity: int, now: datetime) -> None:
        """Add units to the stock and record ProductRestocked."""
        self._require_active("restocked")
        if self.stock_available + quantity > STOCK_MAX:
            raise FailedPrecondition(
                f"the stock of a product cannot exceed {STOCK_MAX} units: product {self.sku!r} has "
                f"{self.stock_available}"
            )
        self.stock_available += quantity
        self._record(
            events_pb2.ProductRestocked(
                product_id=str(self.id),
                sku=self.sku,
                quantity=quantity,
                stock_available=self.stock_available,
                restocked_at=timestamp(now),
            ),
            now,
        )

    def discontinue(self, *, reason: str, now: datetime) -> None:
        """Stop selling the product and record ProductDiscontinued; its stock stays."""
        if self.discontinued:
            raise FailedPrecondition(f"product {self.sku!r} is already discontinued")
        self.discontinued = True
        self.discontinued_reason = reason
        self._record(
            events_pb2.ProductDiscontinued(
                product_id=str(self.id), sku=self.sku, reason=reason, discontinued_at=timestamp(now)
            ),
            now,
        )

    def reserve(self, *, order_id: uuid.UUID, quantity: int, now: datetime) -> None:
        """Take `quantity` units out of stock for an order and record StockReserved."""
        self.require_orderable()
        if quantity < 1:
            raise FailedPrecondition(f"a reservation takes at least one unit of product {self.sku!r}")
        if quantity > self.stock_available:
            raise FailedPrecondition(
                f"insufficient stock for sku {self.sku} (requested {quantity}, available {self.stock_available})"
            )
        self.stock_available -= quantity
        self._record(
            events_pb2.StockReserved(
                product_id=str(self.id),
                sku=self.sku,
                order_id=str(order_id),
                quantity=quantity,
                stock_available=self.stock_available,
                reserved_at=timestamp(now),
            ),
            now,
        )

    def release(self, *, order_id: uuid.UUID, quantity: int, now: datetime) -> None:
        """Return `quantity` units an order had reserved to stock and record StockReleased."""
        if quantity < 1:
            raise FailedPrecondition(f"a release returns at least one unit of product {self.sku!r}")
        self.stock_available += quantity
        self._record(
            events_pb2.StockReleased(
                product_id=str(self.id),
                sku=self.sku,
                order_id=str(order_id),
                quantity=quantity,
                stock_available=self.stock_available,
                released_at=timestamp(now),
            ),
            now,
        )

    def _require_active(self, action: str) -> None:
        if self.discontinued:
            raise FailedPrecondition(f"a discontinued product cannot be {action}: product {self.sku!r}")
