"""Commands of orders (aggregate "order"), validated before any handler runs.

Violations use the protobuf field paths the caller sent: `items[0].quantity`,
`shipping_address.city`, `item.sku`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, ClassVar

from pydantic import AfterValidator, field_validator

from shared_kernel.contracts.errors import FieldViolation
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
from write_service.commands.catalog import sku_value
from write_service.domain.orders import MAX_LINES, MAX_QUANTITY, ORDER_AGGREGATE, Address

NOTES_MAX = 1000
ADDRESS_FIELD_MAX = 200
POSTAL_CODE_MAX = 20
COUNTRY_CODE_PATTERN = re.compile(r"^[A-Z]{2}$")
CARRIER_MAX = 100
TRACKING_NUMBER_PATTERN = re.compile(r"^[A-Za-z0-9 -]{1,100}$")


class OrderItemInput(CommandPart):
    """A sku (matched case-insensitively) and 1 to MAX_QUANTITY units."""

    sku: str
    quantity: int

    @field_validator("sku")
    @classmethod
    def _check_sku(cls, value: str) -> str:
        return sku_value(value)

    @field_validator("quantity")
    @classmethod
    def _check_quantity(cls, value: int) -> int:
        return bounded_int(value, 1, MAX_QUANTITY)


class AddressInput(CommandPart):
    """A shipping address: recipient, line1, city and postal code required; line2 optional."""

    recipient: str
    line1: str
    line2: str = ""
    city: str
    postal_code: str
    country_code: str

    @field_validator("recipient", "line1", "city")
    @classmethod
    def _check_required(cls, value: str) -> str:
        return required_text(value, ADDRESS_FIELD_MAX)

    @field_validator("line2")
    @classmethod
    def _check_line2(cls, value: str) -> str:
        return optional_text(value, ADDRESS_FIELD_MAX)

    @field_validator("postal_code")
    @classmethod
    def _check_postal_code(cls, value: str) -> str:
        return required_text(value, POSTAL_CODE_MAX)

    @field_validator("country_code")
    @classmethod
    def _check_country_code(cls, value: str) -> str:
        if not value:
            raise ValueError("is required")
        if COUNTRY_CODE_PATTERN.fullmatch(value) is None:
            raise ValueError("must be an ISO 3166-1 alpha-2 code: two upper-case letters, e.g. DE")
        return value

    def to_address(self) -> Address:
        """The domain's Address."""
        return Address(**self.model_dump())


class PlaceOrder(Command):
    """Place an order for an active customer; prices come from the catalog."""

    aggregate_type: ClassVar[str] = ORDER_AGGREGATE

    customer_id: AggregateId
    items: tuple[OrderItemInput, ...]
    shipping_address: Annotated[AddressInput, Required]
    notes: str = ""

    @classmethod
    def cross_field_violations(cls, fields: Mapping[str, object]) -> list[FieldViolation]:
        """Each sku at most once (case-insensitively), reported on the repeated item."""
        items = fields.get("items")
        if not isinstance(items, list | tuple) or len(items) > MAX_LINES:
            return []
        seen: dict[str, int] = {}
        violations: list[FieldViolation] = []
        for index, item in enumerate(items):
            sku = item.get("sku") if isinstance(item, Mapping) else None
            if not isinstance(sku, str) or not sku:
                continue
            first = seen.setdefault(sku.lower(), index)
            if first != index:
                violations.append(FieldViolation(f"items[{index}].sku", f"repeats the sku of items[{first}]"))
        return violations

    @field_validator("items", mode="before")
    @classmethod
    def _check_items(cls, value: object) -> object:
        # Before the items are validated one by one, so a huge list is refused at once.
        if isinstance(value, list | tuple) and not 1 <= len(value) <= MAX_LINES:
            raise ValueError(f"must hold 1 to {MAX_LINES} items")
        return value

    @field_validator("notes")
    @classmethod
    def _check_notes(cls, value: str) -> str:
        return optional_text(value, NOTES_MAX, multi_line=True)

    def summary(self) -> dict[str, SummaryValue]:
        """The customer, the skus and their count; never the address or the notes."""
        return {
            "customer_id": str(self.customer_id),
            "items": len(self.items),
            "skus": ",".join(item.sku for item in self.items),
            "notes_chars": len(self.notes),
        }


class _OrderCommand(ChangeCommand):
    """A command on an existing order."""

    aggregate_type: ClassVar[str] = ORDER_AGGREGATE
    id_field: ClassVar[str] = "order_id"

    order_id: AggregateId


class AddOrderItem(_OrderCommand):
    """Add units of a product to a pending order."""

    item: Annotated[OrderItemInput, Required]

    def summary(self) -> dict[str, SummaryValue]:
        """The order, the sku and the units."""
        return self.versioned_summary(sku=self.item.sku, quantity=self.item.quantity)


class CancelOrder(_OrderCommand):
    """Cancel an order that has not shipped."""

    reason: Annotated[str, AfterValidator(lambda value: required_text(value, REASON_MAX))]

    def summary(self) -> dict[str, SummaryValue]:
        """The order and the reason."""
        return self.versioned_summary(reason=self.reason)


class ShipOrder(_OrderCommand):
    """Mark a confirmed order as shipped."""

    carrier: Annotated[str, AfterValidator(lambda value: required_text(value, CARRIER_MAX))]
    tracking_number: str

    @field_validator("tracking_number")
    @classmethod
    def _check_tracking_number(cls, value: str) -> str:
        if not value:
            raise ValueError("is required")
        if TRACKING_NUMBER_PATTERN.fullmatch(value) is None or not value.strip():
            raise ValueError("must be 1 to 100 characters of letters, digits, '-' or ' '")
        return value

    def summary(self) -> dict[str, SummaryValue]:
        """The order, the carrier and the tracking number."""
        return self.versioned_summary(carrier=self.carrier, tracking_number=self.tracking_number)
