"""Queries over the orders read model (key layout in read_service.keys, OrderKeys).

Lists read one sorted index in order and the views of its members; filters (statuses,
text, and the placing time for sorts other than placed_at) are checked on the views. At
most `scan_limit` members are read per call when filtering, so a rare filter may give a
short (even empty) page with a next cursor: callers follow tokens until none is returned.
Statistics read one hash per day of the range and add them up; no order is read.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta

from redis.asyncio.client import Pipeline

from read_service.keys import OrderKeys, OrderSortField, padded
from read_service.projections.orders import sort_member, status_name
from read_service.view_store import QueryCheckpoint, read_single_view, read_view_field
from read_service.views.base import SearchableViews
from read_service.views.checkpointed import first_read
from read_service.views.paging import PageRequest, Search
from read_service.views.wire import view_bytes, view_field
from tessera.common.v1.money_pb2 import Money
from tessera.orders.v1.order_pb2 import OrderStatus
from tessera.orders.v1.order_query_service_pb2 import (
    DailyFigures,
    OrderView,
    ProductQuantity,
    StatusCount,
)

# The statuses an order can be in, in enum order (what GetOrderStatistics reports on).
STATUSES = [s for s in OrderStatus.values() if s != OrderStatus.ORDER_STATUS_UNSPECIFIED]


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


@dataclass(frozen=True, slots=True)
class CustomerOrdersQuery:
    """One page request of ListOrdersByCustomer, validated and normalized."""

    customer_id: str
    page_size: int
    statuses: frozenset[int] = frozenset()
    cursor: bytes | None = None

    def binding(self) -> bytes:
        """What a page token is bound to: the customer and the status filter."""
        return json.dumps(["orders.customer", self.customer_id, sorted(self.statuses)]).encode()


@dataclass(frozen=True, slots=True)
class SearchOrdersQuery:
    """One page request of SearchOrders, validated and normalized."""

    page_size: int
    text: str = ""  # case-folded; empty matches every order
    statuses: frozenset[int] = frozenset()
    placed_from_us: int | None = None  # inclusive, microseconds since the epoch
    placed_to_us: int | None = None  # exclusive
    sort: OrderSortField = OrderSortField.PLACED_AT
    descending: bool = True
    cursor: bytes | None = None

    def binding(self) -> bytes:
        """What a page token is bound to: everything but the size and the cursor."""
        return json.dumps(
            [
                "orders.search",
                self.text,
                sorted(self.statuses),
                self.placed_from_us,
                self.placed_to_us,
                self.sort.value,
                self.descending,
            ]
        ).encode()

    def matches(self, view: OrderView) -> bool:
        """Whether `view` passes the filters."""
        if self.statuses and view.status not in self.statuses:
            return False
        placed = view.placed_at.ToMicroseconds()
        if self.placed_from_us is not None and placed < self.placed_from_us:
            return False
        if self.placed_to_us is not None and placed >= self.placed_to_us:
            return False
        if not self.text:
            return True
        texts = [view.customer_name, view.customer_email]
        for line in view.lines:
            texts.append(line.sku)
            texts.append(line.product_name)
        return any(self.text in t.casefold() for t in texts)


@dataclass(frozen=True, slots=True)
class OrderPage:
    """One page of orders and the cursor to continue after it (None on the last page)."""

    orders: list[OrderView]
    next_cursor: bytes | None


@dataclass(frozen=True, slots=True)
class StatisticsQuery:
    """GetOrderStatistics, validated: one currency, UTC days `first`..`last` (both included)."""

    currency_code: str
    first: date
    last: date
    top_products: int


@dataclass(slots=True)
class Statistics:
    """The figures of a range, summed from its days."""

    currency_code: str
    total_orders: int = 0
    paid_orders: int = 0
    revenue_minor: int = 0
    by_status: list[StatusCount] = field(default_factory=list)
    top_products: list[ProductQuantity] = field(default_factory=list)
    daily: list[DailyFigures] = field(default_factory=list)

    def money(self, amount_minor: int) -> Money:
        """An amount in this range's currency."""
        return Money(currency_code=self.currency_code, amount_minor=amount_minor)

    @property
    def average_minor(self) -> int:
        """Revenue divided by paid orders, rounded down; 0 without paid orders."""
        return self.revenue_minor // self.paid_orders if self.paid_orders else 0


class OrderViews(SearchableViews[OrderKeys]):
    """Reads orders from Redis; raises the driver's errors for the caller to map."""

    async def get(self, order_id: str) -> OrderView | None:
        """The order with this canonical id, or None (through the near cache, when there is one)."""
        key = self._keys.view(order_id)
        field = await (
            self._read_field(key) if self._cache is None else self._cache.get((key,), lambda: self._read_field(key))
        )
        return None if field is None else OrderView.FromString(view_bytes(field))

    async def get_at(self, order_id: str, at: QueryCheckpoint) -> OrderView | None:
        """Like `get`, also setting `at.position`; a read from Redis takes the checkpoint in the same round trip."""
        return await read_single_view(self._client, self._keys.view(order_id), OrderView.FromString, at, self._cache)

    async def field_at(self, order_id: str, at: QueryCheckpoint) -> bytes | None:
        """Like `get_at`, as field 1 of a reply (read_service.views.wire), without parsing the view."""
        return await read_view_field(self._reader, self._client, self._keys.view(order_id), at, self._cache)

    async def _read_field(self, key: str) -> bytes | None:
        raw = await self._client.get(key)
        return None if raw is None else view_field(_as_bytes(raw))

    async def _read(self, order_id: str) -> OrderView | None:
        raw = await self._client.get(self._keys.view(order_id))
        return None if raw is None else OrderView.FromString(_as_bytes(raw))

    async def version(self, order_id: str) -> int:
        """The order version the view reflects (0 when there is none)."""
        view = await self._read(order_id.lower())
        return 0 if view is None else view.version

    async def by_customer(self, query: CustomerOrdersQuery, at: QueryCheckpoint | None = None) -> OrderPage:
        """One page of a customer's orders, newest first; `at`'s checkpoint is read with the first range."""

        def matches(view: OrderView) -> bool:
            return not query.statuses or view.status in query.statuses

        request = self._request(
            self._keys.by_customer(query.customer_id),
            OrderSortField.PLACED_AT,
            descending=True,
            cursor=query.cursor,
            page_size=query.page_size,
            matches=matches,
            filtered=bool(query.statuses),
        )
        page = await self._pager.scan(request, at)
        return OrderPage(page.views, page.next_cursor)

    async def search(self, query: SearchOrdersQuery, at: QueryCheckpoint | None = None) -> OrderPage:
        """One page of matching orders in the query's order; `at`'s checkpoint is read with the first read.

        A text that the trigram index narrows to few candidates is answered from those, with
        full pages; a short or common one by the filtered scan (read_service.views.paging).
        """
        low, high = b"-", b"+"
        if query.sort is OrderSortField.PLACED_AT:
            # The placing-time bounds become bounds of the index range itself.
            if query.placed_from_us is not None:
                low = b"[" + padded(query.placed_from_us).encode()
            if query.placed_to_us is not None:
                high = b"(" + padded(query.placed_to_us).encode()
            filtered = bool(query.text or query.statuses)
        else:
            filtered = bool(
                query.text or query.statuses or query.placed_from_us is not None or query.placed_to_us is not None
            )
        request = self._request(
            self._keys.index(query.sort),
            query.sort,
            descending=query.descending,
            cursor=query.cursor,
            page_size=query.page_size,
            matches=query.matches,
            filtered=filtered,
            low=low,
            high=high,
        )
        if query.text:
            ranked = query.sort is OrderSortField.PLACED_AT
            page = await self._pager.search(request, Search(query.text, self._keys.trigram, ranked), at)
        else:
            page = await self._pager.scan(request, at)
        return OrderPage(page.views, page.next_cursor)

    def _request(
        self,
        index: str,
        sort: OrderSortField,
        *,
        descending: bool,
        cursor: bytes | None,
        page_size: int,
        matches: Callable[[OrderView], bool],
        filtered: bool,
        low: bytes = b"-",
        high: bytes = b"+",
    ) -> PageRequest[OrderView]:
        return PageRequest(
            index=index,
            descending=descending,
            cursor=cursor,
            page_size=page_size,
            view_key=self._keys.view,
            parse=OrderView.FromString,
            matches=matches,
            member_of=lambda view: sort_member(sort, view),
            filtered=filtered,
            low=low,
            high=high,
        )

    async def statistics(self, query: StatisticsQuery, at: QueryCheckpoint | None = None) -> Statistics:
        """The range's figures: one HGETALL per day, in one pipeline with `at`'s checkpoint."""
        days = [query.first + timedelta(days=n) for n in range((query.last - query.first).days + 1)]

        def queue(pipe: Pipeline) -> None:
            for day in days:
                pipe.hgetall(self._keys.stats(query.currency_code, day.isoformat()))

        hashes = await first_read(self._client, at, queue)
        result = Statistics(query.currency_code)
        statuses: Counter[str] = Counter()
        quantities: Counter[str] = Counter()
        names: dict[str, str] = {}
        for day, raw in zip(days, hashes, strict=True):
            figures = {_as_bytes(k).decode(): _as_bytes(v).decode() for k, v in raw.items()}
            placed = int(figures.get("placed", 0))
            revenue = int(figures.get("revenue", 0))
            result.total_orders += placed
            result.paid_orders += int(figures.get("paid", 0))
            result.revenue_minor += revenue
            result.daily.append(DailyFigures(date=day.isoformat(), orders=placed, revenue=result.money(revenue)))
            for name, value in figures.items():
                kind, _, rest = name.partition(":")
                if kind == "status":
                    statuses[rest] += int(value)
                elif kind == "qty":
                    quantities[rest] += int(value)
                elif kind == "name":
                    names[rest] = value  # later days win: the name as last seen
        result.by_status = [StatusCount(status=s, count=statuses[status_name(s)]) for s in STATUSES]
        ranked = sorted(((q, sku) for sku, q in quantities.items() if q > 0), key=lambda item: (-item[0], item[1]))
        result.top_products = [
            ProductQuantity(sku=sku, product_name=names.get(sku, ""), quantity=q)
            for q, sku in ranked[: query.top_products]
        ]
        return result
