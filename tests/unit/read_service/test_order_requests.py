"""Catalog and orders query request validation, without a server."""

from __future__ import annotations

from datetime import date

import pytest

from read_service.entrypoints.catalog_queries import list_products_query
from read_service.entrypoints.order_queries import customer_orders_query, search_orders_query, statistics_query
from read_service.entrypoints.requests import PageLimits
from read_service.keys import OrderSortField
from read_service.page_tokens import PageTokenCodec
from shared_kernel.contracts.errors import InvalidArgument
from tessera.catalog.v1 import product_query_service_pb2 as cpb
from tessera.orders.v1 import order_query_service_pb2 as opb
from tessera.orders.v1.order_pb2 import OrderStatus

LIMITS = PageLimits(default=20, maximum=100)
TOKENS = PageTokenCodec(b"unit-test-secret-0123456789")
CUSTOMER = "7d444840-9dc0-11d1-b245-5ffdce74fad2"


def fields(error: pytest.ExceptionInfo[InvalidArgument]) -> list[str]:
    return sorted(v.field for v in error.value.violations)


def test_search_defaults_newest_first_and_folds_text() -> None:
    query = search_orders_query(opb.SearchOrdersRequest(text="ÄDA"), LIMITS, TOKENS)
    assert (query.sort, query.descending, query.page_size, query.text) == (OrderSortField.PLACED_AT, True, 20, "äda")


def test_search_reports_every_bad_field_together() -> None:
    request = opb.SearchOrdersRequest(text="x" * 101, statuses=[0, 3, 42], sort_by=7, sort_direction=9, page_size=-1)  # type: ignore[list-item, arg-type]
    request.placed_from.seconds = 2_000_000_000
    request.placed_to.seconds = 1_000_000_000
    with pytest.raises(InvalidArgument) as caught:
        search_orders_query(request, LIMITS, TOKENS)
    assert fields(caught) == [
        "page_size",
        "placed_to",
        "sort_by",
        "sort_direction",
        "statuses[0]",
        "statuses[2]",
        "text",
    ]


@pytest.mark.parametrize("text", ["a\nb", "a\x00", "\u2028"])
def test_search_text_with_control_characters_is_refused(text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        search_orders_query(opb.SearchOrdersRequest(text=text), LIMITS, TOKENS)
    assert fields(caught) == ["text"]


def test_search_timestamps_out_of_range_are_refused() -> None:
    request = opb.SearchOrdersRequest()
    request.placed_from.nanos = -1
    request.placed_to.seconds = 253_402_300_800
    with pytest.raises(InvalidArgument) as caught:
        search_orders_query(request, LIMITS, TOKENS)
    assert fields(caught) == ["placed_from", "placed_to"]


def test_page_tokens_are_bound_to_their_search() -> None:
    query = search_orders_query(
        opb.SearchOrdersRequest(text="bolt", statuses=[OrderStatus.ORDER_STATUS_PENDING]), LIMITS, TOKENS
    )
    token = TOKENS.issue(query.binding(), b"cursor")
    again = search_orders_query(
        opb.SearchOrdersRequest(text="BOLT", statuses=[OrderStatus.ORDER_STATUS_PENDING], page_token=token),
        LIMITS,
        TOKENS,
    )
    assert again.cursor == b"cursor"
    for other in (
        opb.SearchOrdersRequest(text="bolt", page_token=token),
        opb.SearchOrdersRequest(
            text="bolt",
            statuses=[OrderStatus.ORDER_STATUS_PENDING],
            sort_by=opb.ORDER_SORT_FIELD_TOTAL,
            page_token=token,
        ),
    ):
        with pytest.raises(InvalidArgument) as caught:
            search_orders_query(other, LIMITS, TOKENS)
        assert fields(caught) == ["page_token"]


def test_customer_orders_validation() -> None:
    query = customer_orders_query(
        opb.ListOrdersByCustomerRequest(
            customer_id=CUSTOMER.upper(),
            statuses=[OrderStatus.ORDER_STATUS_PENDING, OrderStatus.ORDER_STATUS_CANCELLED],
        ),
        LIMITS,
        TOKENS,
    )
    assert (query.customer_id, query.statuses) == (CUSTOMER, frozenset({1, 5}))
    with pytest.raises(InvalidArgument) as caught:
        customer_orders_query(opb.ListOrdersByCustomerRequest(customer_id="x", page_size=101), LIMITS, TOKENS)
    assert fields(caught) == ["customer_id", "page_size"]
    token = TOKENS.issue(query.binding(), b"c")
    with pytest.raises(InvalidArgument):
        customer_orders_query(
            opb.ListOrdersByCustomerRequest(customer_id="00000000-0000-0000-0000-000000000001", page_token=token),
            LIMITS,
            TOKENS,
        )


@pytest.mark.parametrize(
    ("request_fields", "bad"),
    [
        ({}, ["currency_code", "from_date", "to_date"]),
        ({"from_date": "2024-1-01", "to_date": "2024-01-02", "currency_code": "EUR"}, ["from_date"]),
        ({"from_date": "2024-02-30", "to_date": "2024-03-01", "currency_code": "EUR"}, ["from_date"]),
        ({"from_date": "2024-03-02", "to_date": "2024-03-01", "currency_code": "EUR"}, ["to_date"]),
        ({"from_date": "2024-01-01", "to_date": "2025-01-02", "currency_code": "EUR"}, ["to_date"]),
        ({"from_date": "2024-01-01", "to_date": "2024-01-02", "currency_code": "Eur"}, ["currency_code"]),
        (
            {"from_date": "2024-01-01", "to_date": "2024-01-02", "currency_code": "EUR", "top_products": 101},
            ["top_products"],
        ),
        (
            {"from_date": "2024-01-01", "to_date": "2024-01-02", "currency_code": "EUR", "top_products": -1},
            ["top_products"],
        ),
    ],
)
def test_statistics_validation(request_fields: dict[str, object], bad: list[str]) -> None:
    with pytest.raises(InvalidArgument) as caught:
        statistics_query(opb.GetOrderStatisticsRequest(**request_fields))  # type: ignore[arg-type]
    assert fields(caught) == bad


def test_statistics_accepts_366_days_and_defaults_top_products() -> None:
    query = statistics_query(
        opb.GetOrderStatisticsRequest(from_date="2024-01-01", to_date="2025-01-01", currency_code="JPY")
    )
    assert (query.first, query.last, query.top_products, query.currency_code) == (
        date(2024, 1, 1),
        date(2025, 1, 1),
        10,
        "JPY",
    )


def test_list_products_validation_and_binding() -> None:
    query = list_products_query(cpb.ListProductsRequest(include_discontinued=True), LIMITS, TOKENS)
    assert (query.page_size, query.include_discontinued) == (20, True)
    token = TOKENS.issue(query.binding(), b"abc\x00id")
    with pytest.raises(InvalidArgument) as caught:
        list_products_query(cpb.ListProductsRequest(page_token=token), LIMITS, TOKENS)
    assert fields(caught) == ["page_token"]
    with pytest.raises(InvalidArgument) as caught:
        list_products_query(cpb.ListProductsRequest(page_size=-5), LIMITS, TOKENS)
    assert fields(caught) == ["page_size"]
