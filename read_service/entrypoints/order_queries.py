"""tessera.orders.v1.OrderQueryService: orders and their statistics, with the shared freshness contract."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import date
from typing import Any, TypeVar

import grpc

from read_service.consistency import ORDER_AGGREGATE, token_for
from read_service.entrypoints.answers import SingleViewQuery, answer_page, watch_one
from read_service.entrypoints.freshness import Freshness
from read_service.entrypoints.requests import (
    PageLimits,
    currency_code,
    open_page_token,
    page_size,
    statuses,
    text,
    timestamp_micros,
)
from read_service.keys import OrderSortField
from read_service.page_tokens import PageTokenCodec
from read_service.view_store import QueryCheckpoint
from read_service.views.orders import (
    CustomerOrdersQuery,
    OrderPage,
    OrderViews,
    SearchOrdersQuery,
    StatisticsQuery,
)
from read_service.watch import Change
from shared_kernel.contracts import errors
from shared_kernel.contracts.validation import parse_uuid, uuid_violation
from shared_kernel.platform.grpc_server import add_preserialized
from tessera.orders.v1 import order_query_service_pb2 as pb
from tessera.orders.v1 import order_query_service_pb2_grpc as pb_grpc

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["OrderQueryService"].full_name
# Methods that answer serialized replies (registered with shared_kernel.platform.grpc_server.add_preserialized).
BYTES_METHODS = ("GetOrder",)


Q = TypeVar("Q", CustomerOrdersQuery, SearchOrdersQuery)

# The longest date range GetOrderStatistics covers: to_date at most this many days after from_date.
MAX_RANGE_DAYS = 366
TOP_PRODUCTS_DEFAULT = 10
TOP_PRODUCTS_MAX = 100
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

_SORTS = {
    pb.ORDER_SORT_FIELD_UNSPECIFIED: OrderSortField.PLACED_AT,
    pb.ORDER_SORT_FIELD_PLACED_AT: OrderSortField.PLACED_AT,
    pb.ORDER_SORT_FIELD_TOTAL: OrderSortField.TOTAL,
    pb.ORDER_SORT_FIELD_UPDATED_AT: OrderSortField.UPDATED_AT,
}
_DIRECTIONS = {
    pb.ORDER_SORT_DIRECTION_UNSPECIFIED: True,
    pb.ORDER_SORT_DIRECTION_ASC: False,
    pb.ORDER_SORT_DIRECTION_DESC: True,
}


def _one_of(field: str, names: list[str]) -> errors.FieldViolation:
    return errors.FieldViolation(field, "must be one of " + ", ".join(names))


def customer_orders_query(
    request: pb.ListOrdersByCustomerRequest, limits: PageLimits, tokens: PageTokenCodec
) -> CustomerOrdersQuery:
    """Validate a ListOrdersByCustomerRequest; raises InvalidArgument listing every bad field."""
    violations: list[errors.FieldViolation] = []
    violation = uuid_violation("customer_id", request.customer_id)
    if violation is not None:
        violations.append(violation)
    wanted = statuses(request.statuses, violations)
    size = page_size(request.page_size, limits, violations)
    if violations:
        raise errors.InvalidArgument(violations)
    query = CustomerOrdersQuery(request.customer_id.lower(), size, wanted)
    cursor = open_page_token(tokens, request.page_token, query.binding())
    return CustomerOrdersQuery(query.customer_id, size, wanted, cursor)


def search_orders_query(
    request: pb.SearchOrdersRequest, limits: PageLimits, tokens: PageTokenCodec
) -> SearchOrdersQuery:
    """Validate a SearchOrdersRequest; raises InvalidArgument listing every bad field."""
    violations: list[errors.FieldViolation] = []
    needle = text(request.text, "text", violations)
    wanted = statuses(request.statuses, violations)
    placed_from = timestamp_micros(request.placed_from, request.HasField("placed_from"), "placed_from", violations)
    placed_to = timestamp_micros(request.placed_to, request.HasField("placed_to"), "placed_to", violations)
    if placed_from is not None and placed_to is not None and placed_from > placed_to:
        violations.append(errors.FieldViolation("placed_to", "must not be before placed_from"))
    sort = _SORTS.get(request.sort_by)
    if sort is None:
        violations.append(_one_of("sort_by", list(pb.OrderSortField.keys())[1:]))
    descending = _DIRECTIONS.get(request.sort_direction)
    if descending is None:
        violations.append(_one_of("sort_direction", list(pb.OrderSortDirection.keys())[1:]))
    size = page_size(request.page_size, limits, violations)
    if violations:
        raise errors.InvalidArgument(violations)
    assert sort is not None and descending is not None
    query = SearchOrdersQuery(size, needle, wanted, placed_from, placed_to, sort, descending)
    cursor = open_page_token(tokens, request.page_token, query.binding())
    return SearchOrdersQuery(size, needle, wanted, placed_from, placed_to, sort, descending, cursor)


def _day(value: str, field: str, violations: list[errors.FieldViolation]) -> date | None:
    if not value:
        violations.append(errors.FieldViolation(field, "is required"))
        return None
    parsed = None
    if _DATE.match(value):
        try:
            parsed = date.fromisoformat(value)
        except ValueError:
            parsed = None
    if parsed is None:
        violations.append(errors.FieldViolation(field, "must be a date YYYY-MM-DD"))
    return parsed


def statistics_query(request: pb.GetOrderStatisticsRequest) -> StatisticsQuery:
    """Validate a GetOrderStatisticsRequest; raises InvalidArgument listing every bad field."""
    violations: list[errors.FieldViolation] = []
    first = _day(request.from_date, "from_date", violations)
    last = _day(request.to_date, "to_date", violations)
    if first is not None and last is not None:
        if last < first:
            violations.append(errors.FieldViolation("to_date", "must not be before from_date"))
        elif (last - first).days > MAX_RANGE_DAYS:
            violations.append(
                errors.FieldViolation("to_date", f"must be at most {MAX_RANGE_DAYS} days after from_date")
            )
    if not 0 <= request.top_products <= TOP_PRODUCTS_MAX:
        violations.append(errors.FieldViolation("top_products", f"must be between 0 and {TOP_PRODUCTS_MAX}"))
    currency = currency_code(request.currency_code, "currency_code", violations)
    if violations:
        raise errors.InvalidArgument(violations)
    assert first is not None and last is not None
    return StatisticsQuery(currency, first, last, request.top_products or TOP_PRODUCTS_DEFAULT)


class OrderQueryServicer(pb_grpc.OrderQueryServiceServicer):
    """Serves OrderQueryService from the orders views."""

    def __init__(
        self,
        views: OrderViews,
        tokens: PageTokenCodec,
        freshness: Freshness,
        limits: PageLimits | None = None,
        *,
        watch_order: Callable[[str, int | None], AsyncIterator[Change]] | None = None,
        watch_customer: Callable[[str, int | None], AsyncIterator[tuple[int, list[Change]]]] | None = None,
    ) -> None:
        self._watch_order = watch_order
        self._watch_customer = watch_customer
        self._views = views
        self._tokens = tokens
        self._freshness = freshness
        self._limits = limits or PageLimits()
        self._order = SingleViewQuery(
            views, freshness, aggregate_type=ORDER_AGGREGATE, id_field="order_id", parse=pb.OrderView.FromString
        )

    async def GetOrder(self, request: pb.GetOrderRequest, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:  # type: ignore[override]  # bytes: see BYTES_METHODS
        """One order by id: a serialized GetOrderResponse (see read_service.views.wire)."""
        return await self._order.answer(request.order_id, request.consistency_token, request.max_wait_ms, context)

    async def ListOrdersByCustomer(
        self, request: pb.ListOrdersByCustomerRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListOrdersByCustomerResponse:
        """One page of a customer's orders, newest first."""
        query = customer_orders_query(request, self._limits, self._tokens)
        page, token, stale, position = await self._page(request, context, query, self._views.by_customer)
        return pb.ListOrdersByCustomerResponse(
            orders=page.orders, next_page_token=token, stale=stale, view_position=position
        )

    async def SearchOrders(
        self, request: pb.SearchOrdersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SearchOrdersResponse:
        """One page of matching orders."""
        query = search_orders_query(request, self._limits, self._tokens)
        page, token, stale, position = await self._page(request, context, query, self._views.search)
        return pb.SearchOrdersResponse(orders=page.orders, next_page_token=token, stale=stale, view_position=position)

    async def _page(
        self,
        request: pb.ListOrdersByCustomerRequest | pb.SearchOrdersRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        query: Q,
        read: Callable[[Q, QueryCheckpoint], Awaitable[OrderPage]],
    ) -> tuple[OrderPage, str, bool, int]:
        return await answer_page(
            self._freshness, self._tokens, context, aggregate_type=ORDER_AGGREGATE,
            consistency_token=request.consistency_token, max_wait_ms=request.max_wait_ms, query=query,
            read=lambda at: read(query, at),
        )  # fmt: skip

    async def GetOrderStatistics(
        self, request: pb.GetOrderStatisticsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetOrderStatisticsResponse:
        """The figures of a date range in one currency, from the per-day aggregates."""
        query = statistics_query(request)
        token = token_for(ORDER_AGGREGATE, request.consistency_token)
        figures, stale, position = await self._freshness.answer_at(
            context, token, request.max_wait_ms, lambda at: self._views.statistics(query, at)
        )
        return pb.GetOrderStatisticsResponse(
            total_orders=figures.total_orders,
            revenue=figures.money(figures.revenue_minor),
            average_order_value=figures.money(figures.average_minor),
            orders_by_status=figures.by_status,
            top_products=figures.top_products,
            daily=figures.daily,
            stale=stale,
            view_position=position,
        )

    async def WatchOrder(
        self, request: pb.WatchOrderRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchOrderResponse]:
        """The order's view now (or that it does not exist yet), then each change (read_service.watch).

        With `after_position`, each change after it instead of the view now.
        """
        async for reply in watch_one(self._freshness, self._watch_order, request, "order_id", _watch_reply):
            yield reply

    async def WatchOrdersByCustomer(
        self, request: pb.WatchOrdersByCustomerRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchOrdersByCustomerResponse]:
        """The customer's orders now, then each change of one of them or a new one (read_service.watch).

        With `after_position`, no first snapshot: each change after it instead (`initial` is never set).
        """
        customer_id = str(parse_uuid("customer_id", request.customer_id))
        after = request.after_position if request.HasField("after_position") else None
        self._freshness.require_ready()
        if self._watch_customer is None:
            raise errors.Unavailable("this replica does not serve watches")
        initial = after is None
        async for position, changes in self._watch_customer(customer_id, after):
            orders = [pb.OrderView.FromString(c.value) for c in changes if c.value is not None]
            if not initial and not orders:
                continue
            yield pb.WatchOrdersByCustomerResponse(orders=orders, initial=initial, view_position=position)
            initial = False


def _watch_reply(value: bytes | None, position: int) -> pb.WatchOrderResponse:
    if value is None:
        return pb.WatchOrderResponse(exists=False, view_position=position)
    view = pb.OrderView.FromString(value)
    return pb.WatchOrderResponse(order=view, exists=True, version=view.version, view_position=position)


# How the servicer is added to a server: the generated registration, with BYTES_METHODS answering bytes.
register_order_queries = add_preserialized(pb_grpc.add_OrderQueryServiceServicer_to_server, BYTES_METHODS)
