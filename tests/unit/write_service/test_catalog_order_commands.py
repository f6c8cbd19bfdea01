"""Validation of the catalog and order commands: every bad field is named by its protobuf path."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from shared_kernel.contracts.errors import InvalidArgument
from tests.unit.write_service import helpers
from write_service.commands.base import Command
from write_service.commands.catalog import AddProduct, DiscontinueProduct, RestockProduct, UpdateProductPrice
from write_service.commands.orders import AddOrderItem, CancelOrder, PlaceOrder, ShipOrder

ID = str(uuid.uuid4())


def product_fields(**overrides: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "sku": "SKU-1",
        "name": "Engine",
        "price": {"currency_code": "EUR", "amount_minor": 1},
        "initial_stock": 0,
    }
    return fields | overrides


def order_fields(**overrides: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "customer_id": ID,
        "items": [{"sku": "SKU-1", "quantity": 1}],
        "shipping_address": dict(helpers.ADDRESS),
        "notes": "",
    }
    return fields | overrides


def address(**overrides: str) -> dict[str, object]:
    return order_fields(shipping_address=helpers.ADDRESS | overrides)


def violations(command: type[Command], fields: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as exc_info:
        command.parse(fields)
    return {v.field: v.description for v in exc_info.value.violations}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (product_fields(sku=""), "sku"),
        (product_fields(sku="a b"), "sku"),
        (product_fields(sku="x" * 65), "sku"),
        (product_fields(sku="sku\n"), "sku"),
        (product_fields(name=""), "name"),
        (product_fields(name="   "), "name"),
        (product_fields(name="n" * 201), "name"),
        (product_fields(name="a\x00b"), "name"),
        (product_fields(price=None), "price"),
        (product_fields(price={"currency_code": "eur", "amount_minor": 1}), "price.currency_code"),
        (product_fields(price={"currency_code": "XYZ", "amount_minor": 1}), "price.currency_code"),
        (product_fields(price={"currency_code": "", "amount_minor": 1}), "price.currency_code"),
        (product_fields(price={"currency_code": "EUR", "amount_minor": -1}), "price.amount_minor"),
        (product_fields(price={"currency_code": "EUR", "amount_minor": 10**12 + 1}), "price.amount_minor"),
        (product_fields(initial_stock=-1), "initial_stock"),
        (product_fields(initial_stock=1_000_000_001), "initial_stock"),
    ],
)
def test_add_product_names_the_bad_field(fields, field):
    assert list(violations(AddProduct, fields)) == [field]


def test_add_product_reports_every_violation_at_once():
    found = violations(AddProduct, {"sku": "", "name": "", "price": None, "initial_stock": -5})
    assert set(found) == {"sku", "name", "price", "initial_stock"}


def test_product_commands_check_ids_quantities_and_reasons():
    assert list(violations(RestockProduct, {"product_id": "nope", "quantity": 1})) == ["product_id"]
    assert list(violations(RestockProduct, {"product_id": ID, "quantity": 0})) == ["quantity"]
    assert list(violations(RestockProduct, {"product_id": ID, "quantity": 1, "expected_version": 0})) == [
        "expected_version"
    ]
    assert list(violations(UpdateProductPrice, {"product_id": ID, "price": None})) == ["price"]
    assert list(violations(DiscontinueProduct, {"product_id": ID, "reason": "a\r\nb"})) == ["reason"]
    assert list(violations(DiscontinueProduct, {"product_id": ID, "reason": "r" * 501})) == ["reason"]
    assert DiscontinueProduct.parse({"product_id": ID, "reason": ""}).reason == ""


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (order_fields(customer_id=""), "customer_id"),
        (order_fields(items=[]), "items"),
        (order_fields(items=[{"sku": f"S-{n}", "quantity": 1} for n in range(101)]), "items"),
        (order_fields(items=[{"sku": "S-1", "quantity": 0}]), "items[0].quantity"),
        (order_fields(items=[{"sku": "S-1", "quantity": 1}, {"sku": "S-2", "quantity": 10_001}]), "items[1].quantity"),
        (order_fields(items=[{"sku": "", "quantity": 1}]), "items[0].sku"),
        (order_fields(items=[{"sku": "S-1", "quantity": 1}, {"sku": "s-1", "quantity": 1}]), "items[1].sku"),
        (order_fields(shipping_address=None), "shipping_address"),
        (address(recipient=""), "shipping_address.recipient"),
        (address(line1="  "), "shipping_address.line1"),
        (address(line2="x\ny"), "shipping_address.line2"),
        (address(city="c" * 201), "shipping_address.city"),
        (address(postal_code=""), "shipping_address.postal_code"),
        (address(country_code="de"), "shipping_address.country_code"),
        (address(country_code="DEU"), "shipping_address.country_code"),
        (order_fields(notes="n" * 1001), "notes"),
        (order_fields(notes="bad\rreturn"), "notes"),
    ],
)
def test_place_order_names_the_bad_field(fields, field):
    assert list(violations(PlaceOrder, fields)) == [field]


def test_place_order_allows_line_feeds_and_tabs_in_notes_and_reports_all_violations():
    assert PlaceOrder.parse(order_fields(notes="leave at\tthe door\nthanks")).notes.endswith("thanks")
    found = violations(
        PlaceOrder,
        order_fields(
            customer_id="x",
            items=[{"sku": "A", "quantity": 0}, {"sku": "a", "quantity": 1}],
            shipping_address=helpers.ADDRESS | {"city": "", "country_code": "zz"},
        ),
    )
    assert set(found) == {
        "customer_id",
        "items[0].quantity",
        "items[1].sku",
        "shipping_address.city",
        "shipping_address.country_code",
    }


def test_order_commands_check_their_fields():
    assert list(violations(AddOrderItem, {"order_id": ID, "item": None})) == ["item"]
    assert list(violations(AddOrderItem, {"order_id": ID, "item": {"sku": "S", "quantity": -1}})) == ["item.quantity"]
    assert list(violations(CancelOrder, {"order_id": ID, "reason": ""})) == ["reason"]
    assert list(violations(CancelOrder, {"order_id": ID, "reason": "r" * 501})) == ["reason"]
    ship = {"order_id": ID, "carrier": "DHL", "tracking_number": "AB-12 34"}
    assert ShipOrder.parse(ship).tracking_number == "AB-12 34"
    assert list(violations(ShipOrder, ship | {"carrier": ""})) == ["carrier"]
    assert list(violations(ShipOrder, ship | {"carrier": "c" * 101})) == ["carrier"]
    for bad in ("", "AB_12", "x" * 101, "   ", "AB\n12"):
        assert list(violations(ShipOrder, ship | {"tracking_number": bad})) == ["tracking_number"]


def test_fingerprints_cover_nested_items_and_address():
    first = PlaceOrder.parse(order_fields()).fingerprint_fields()
    other = PlaceOrder.parse(address(city="Paris")).fingerprint_fields()
    assert first != other
    assert first["items"] == [{"sku": "SKU-1", "quantity": 1}]
