"""Commands of the catalog (aggregate "product"), validated before any handler runs.

Field names match the protobuf request fields, so a violation names the field the caller
sent (`price.currency_code`, `initial_stock`).
"""

from __future__ import annotations

import re
from typing import Annotated, ClassVar

from pydantic import AfterValidator, field_validator

from write_service.commands.base import (
    REASON_MAX,
    AggregateId,
    ChangeCommand,
    Command,
    CommandPart,
    Required,
    SummaryValue,
    bounded_int,
    optional_text,
    required_text,
)
from write_service.domain.catalog import PRODUCT_AGGREGATE
from write_service.domain.money import CURRENCY_CODES, PRICE_MAX_MINOR

SKU_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
PRODUCT_NAME_MAX = 200
# Most units one command may add (or start with): a billion.
QUANTITY_MAX = 1_000_000_000


class MoneyInput(CommandPart):
    """An amount of money as a caller sends it: a known ISO 4217 code and minor units >= 0."""

    currency_code: str
    amount_minor: int

    @field_validator("currency_code")
    @classmethod
    def _check_currency(cls, value: str) -> str:
        if not value:
            raise ValueError("is required")
        if value not in CURRENCY_CODES:
            raise ValueError("must be a known ISO 4217 currency code in upper case, e.g. EUR")
        return value

    @field_validator("amount_minor")
    @classmethod
    def _check_amount(cls, value: int) -> int:
        return bounded_int(value, 0, PRICE_MAX_MINOR)


def sku_value(value: str) -> str:
    """`value` if it is a well-formed sku."""
    if not value:
        raise ValueError("is required")
    if SKU_PATTERN.fullmatch(value) is None:
        raise ValueError("must be 1 to 64 characters of letters, digits, '-', '_' or '.'")
    return value


class _ProductCommand(ChangeCommand):
    """A command on an existing product."""

    aggregate_type: ClassVar[str] = PRODUCT_AGGREGATE
    id_field: ClassVar[str] = "product_id"

    product_id: AggregateId


class AddProduct(Command):
    """Add a product to the catalog."""

    aggregate_type: ClassVar[str] = PRODUCT_AGGREGATE

    sku: str
    name: str
    price: Annotated[MoneyInput, Required]
    initial_stock: Annotated[int, AfterValidator(lambda value: bounded_int(value, 0, QUANTITY_MAX))]

    @field_validator("sku")
    @classmethod
    def _check_sku(cls, value: str) -> str:
        return sku_value(value)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return required_text(value, PRODUCT_NAME_MAX)

    def summary(self) -> dict[str, SummaryValue]:
        """The sku, the price and the stock."""
        return {
            "sku": self.sku,
            "currency_code": self.price.currency_code,
            "price_minor": self.price.amount_minor,
            "initial_stock": self.initial_stock,
        }


class UpdateProductPrice(_ProductCommand):
    """Set a product's unit price (in its own currency)."""

    price: Annotated[MoneyInput, Required]

    def summary(self) -> dict[str, SummaryValue]:
        """The product and the new price."""
        return self.versioned_summary(currency_code=self.price.currency_code, price_minor=self.price.amount_minor)


class RestockProduct(_ProductCommand):
    """Add units to a product's stock."""

    quantity: Annotated[int, AfterValidator(lambda value: bounded_int(value, 1, QUANTITY_MAX))]

    def summary(self) -> dict[str, SummaryValue]:
        """The product and the units added."""
        return self.versioned_summary(quantity=self.quantity)


class DiscontinueProduct(_ProductCommand):
    """Stop selling a product."""

    reason: Annotated[str, AfterValidator(lambda value: optional_text(value, REASON_MAX))] = ""

    def summary(self) -> dict[str, SummaryValue]:
        """The product and the reason."""
        return self.versioned_summary(reason=self.reason)
