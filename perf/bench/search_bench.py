"""Search rows: ListUsers `search` and SearchOrders `text` over the trigram index, at several sizes.

For each size N the bench seeds a fresh database's event log with N user registrations (or N
placed orders) by COPY, positioned and published as the relay leaves them (as the rebuild
bench does), three of which hold a rare term. It builds the projection with
`read_service.rebuild` twice, once with the search index ops dropped and once as it is, which
gives the rebuild's slowdown from the index (live apply runs the same projection and apply
script per event, so its slowdown is of the same order). Then it reads first pages (20 per
page) of a rare term, a common term and a prefix through the query code the replicas run
(read_service.views), and measures the index's memory (MEMORY USAGE of every trigram sorted
set) per entity. Today's capped scan answers the rare term as the ceiling column.

    python -m perf bench --only search --search-sizes 100000,1000000
"""

from __future__ import annotations

import functools
import secrets
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from perf.event_log import copy_positioned
from perf.stack import Backing, scratch_database
from read_service.generations import drop_keyspace, keyspace_prefix
from read_service.keys import OrderKeys, UserKeys
from read_service.projections.base import Effect
from read_service.rebuild import ProjectionSpec, rebuild, registered_projections
from read_service.upcasting import current_version
from read_service.views.orders import OrderViews, SearchOrdersQuery
from read_service.views.users import ListUsersQuery, UserViews
from tessera.common.v1.money_pb2 import Money
from tessera.orders.v1.events_pb2 import OrderPlaced
from tessera.orders.v1.order_pb2 import OrderLine
from tessera.users.v1.events_pb2 import UserRegistered

from .table import Goal, Row

RARE = "qzxv"
PAGE_SIZE = 20
_FIRST = ["anna", "ben", "carla", "dan", "emma", "finn", "gina", "hugo", "ida", "jon", "kai", "lena", "max", "nora"]
_LAST = ["smith", "jones", "brown", "taylor", "wilson", "evans", "thomas", "roberts", "walker", "wright"]
_PRODUCTS = [("ANV-1", "Anvil"), ("BLT-2", "Bolt"), ("CHS-3", "Chisel"), ("DRL-4", "Drill"), ("SAW-5", "Saw")]
_BASE = datetime(2025, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class SearchSizes:
    """Entities per size, queries per figure."""

    sizes: tuple[int, ...] = (100_000, 1_000_000)
    queries: int = 200
    batch_size: int = 5000


def parse_sizes(text: str) -> tuple[int, ...]:
    """`--search-sizes 100000,1000000` -> (100000, 1000000)."""
    sizes = tuple(int(part.replace("_", "")) for part in text.split(",") if part.strip())
    if not sizes or min(sizes) < 100:
        raise ValueError("search sizes must be at least 100 each")
    return sizes


class _WithoutIndex:
    """A projection with its search index ops dropped: the baseline the index's cost is measured against."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.name = inner.name
        self.handles = inner.handles

    @property
    def checkpoint_key(self) -> str:
        return str(self._inner.checkpoint_key)

    def state_keys(self, envelope: Any) -> Sequence[str]:
        return list(self._inner.state_keys(envelope))

    def project(self, envelope: Any, state: Mapping[str, bytes | None]) -> Effect:
        effect: Effect = self._inner.project(envelope, state)
        trigram = f"{self.name}:tri:"  # the trigram sets (read_service.keys)
        kept = [op for op in effect.ops if trigram not in str(op[1])]
        return Effect(kept, effect.state)


def _name(n: int) -> tuple[str, str]:
    return _FIRST[n % len(_FIRST)], _LAST[(n // len(_FIRST)) % len(_LAST)]


def _rare(n: int, count: int) -> bool:
    return n in (count // 7, count // 2, count - 3)


def _user_rows(count: int) -> Iterator[tuple[Any, ...]]:
    for n in range(count):
        first, last = _name(n)
        user_id = str(uuid.UUID(int=n + 1, version=4))
        full = f"{first.title()} {last.title()}" + (f" Mc{RARE.title()}" if _rare(n, count) else "")
        payload = UserRegistered(
            user_id=user_id, email=f"{first}.{last}{n}@example.com", username=f"{first}_{n}", display_name=full
        )
        at = _BASE + timedelta(seconds=n)
        payload.registered_at.FromDatetime(at)
        name = payload.DESCRIPTOR.full_name
        yield (uuid.uuid4(), name, current_version(name), "user", user_id, 1, payload.SerializeToString(), at, n + 1)


def _order_rows(count: int) -> Iterator[tuple[Any, ...]]:
    for n in range(count):
        first, last = _name(n)
        order_id = str(uuid.UUID(int=n + 1, version=4))
        sku, product = _PRODUCTS[n % len(_PRODUCTS)]
        quantity = 1 + n % 4
        line = OrderLine(
            product_id=str(uuid.UUID(int=(n % len(_PRODUCTS)) + 1, version=4)),
            sku=sku,
            product_name=product,
            quantity=quantity,
            unit_price=Money(currency_code="EUR", amount_minor=1000),
            line_total=Money(currency_code="EUR", amount_minor=1000 * quantity),
        )
        customer = f"{first.title()} {last.title()}" + (f" Mc{RARE.title()}" if _rare(n, count) else "")
        payload = OrderPlaced(
            order_id=order_id,
            customer_id=str(uuid.UUID(int=(n % 50_000) + 1, version=4)),
            customer_name=customer,
            customer_email=f"{first}.{last}{n}@example.com",
            lines=[line],
            total=Money(currency_code="EUR", amount_minor=1000 * quantity),
        )
        at = _BASE + timedelta(seconds=n)
        payload.placed_at.FromDatetime(at)
        name = payload.DESCRIPTOR.full_name
        yield (uuid.uuid4(), name, current_version(name), "order", order_id, 1, payload.SerializeToString(), at, n + 1)


async def _seed(pool: asyncpg.Pool[Any], rows: Iterator[tuple[Any, ...]], count: int, chunk: int = 20_000) -> None:
    async with pool.acquire() as conn, conn.transaction():
        batch: list[tuple[Any, ...]] = []
        for row in rows:
            batch.append(row)
            if len(batch) == chunk:
                await copy_positioned(conn, batch)
                batch = []
        if batch:
            await copy_positioned(conn, batch)
        await conn.execute("UPDATE relay_state SET last_position = $1, published_position = $1", count)


async def _latencies(run: Callable[[], Awaitable[int]], times: int) -> tuple[float, float, int]:
    """p50 and p99 in ms of `times` calls, and the results of the last one."""
    found = await run()  # warm the connection
    samples = []
    for _ in range(times):
        began = time.perf_counter()
        found = await run()
        samples.append((time.perf_counter() - began) * 1000)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))], found


async def _index_bytes(client: aioredis.Redis, match: str) -> tuple[int, int]:
    """Total MEMORY USAGE of the keys matching `match`, and how many there are."""
    total = keys = 0
    batch: list[bytes] = []

    async def flush() -> int:
        async with client.pipeline(transaction=False) as pipe:
            for key in batch:
                pipe.memory_usage(key)
            sizes = await pipe.execute()
        return sum(int(s or 0) for s in sizes)

    async for key in client.scan_iter(match=match, count=5000):
        batch.append(key)
        keys += 1
        if len(batch) == 1000:
            total += await flush()
            batch = []
    if batch:
        total += await flush()
    return total, keys


def search_rows(sizes: SearchSizes) -> list[Row]:
    """The rows this bench fills (blank)."""
    rows: list[Row] = []
    for kind in ("users", "orders"):
        for n in sizes.sizes:
            rows.extend(_blank(kind, n))
    return rows


def _blank(kind: str, n: int) -> list[Row]:
    rpc = "ListUsers search" if kind == "users" else "SearchOrders text"
    how = f"read_service.views over real Redis, first page of {PAGE_SIZE}, {n:,} {kind}"
    rows = [
        Row(
            key="search",
            figure=f"{rpc}, rare term (3 hits), {n:,} {kind}, p99",
            unit="ms",
            goal=Goal("value", "<=", 20, "ms"),
            how=how,
            ceiling_label="today's capped scan, same term (p99; a short page)",
        ),
        Row(
            key="search",
            figure=f"{rpc}, common term, {n:,} {kind}, p99",
            unit="ms",
            goal=Goal("value", "<=", 20, "ms"),
            how=how,
        ),
        Row(
            key="search",
            figure=f"{rpc}, prefix term, {n:,} {kind}, p99",
            unit="ms",
            goal=Goal("value", "<=", 20, "ms"),
            how=how,
        ),
        Row(
            key="search",
            figure=f"search index memory per {kind[:-1]}, {n:,} {kind}",
            unit="bytes",
            goal=Goal("value", "<=", 4096, "bytes"),
            how="MEMORY USAGE of every trigram set ÷ entities",
        ),
        Row(
            key="search",
            figure=f"rebuild ({kind}) with the index, {n:,} events, events/s",
            unit="events/s",
            goal=Goal("ratio", ">=", 0.5),
            how="read_service.rebuild",
            ceiling_label="the same rebuild without the index ops",
        ),
    ]
    return rows


async def _measure_one(
    backing: Backing, kind: str, n: int, sizes: SearchSizes, say: Callable[[str], None]
) -> list[Row]:
    rows = _blank(kind, n)
    rare_row, common_row, prefix_row, memory_row, rebuild_row = rows
    spec = registered_projections()[kind]
    bare = ProjectionSpec(kind, spec.version, lambda p: _WithoutIndex(spec.factory(p)))
    prefix = f"bench:search:{secrets.token_hex(4)}:"
    async with scratch_database(backing.admin_url) as url:
        pool: asyncpg.Pool[Any] = await asyncpg.create_pool(url, min_size=1, max_size=4)
        client = aioredis.Redis.from_url(backing.redis_url, socket_timeout=60)
        try:
            say(f"search: seeding {n:,} {kind}")
            await _seed(pool, _user_rows(n) if kind == "users" else _order_rows(n), n)
            say(f"search: building {kind} without the index")
            without = await rebuild(client, pool, prefix, bare, batch_size=sizes.batch_size, stream=sys.stderr)
            say(f"search: building {kind} with the index")
            built = await rebuild(
                client, pool, prefix, spec, batch_size=sizes.batch_size, grace_s=0.0, stream=sys.stderr
            )
            rebuild_row.value = built.events_per_s
            rebuild_row.ceiling = without.events_per_s
            space = keyspace_prefix(prefix, kind, built.generation)
            used, keys = await _index_bytes(client, f"{space}{kind}:tri:*")
            memory_row.value = used / n
            memory_row.notes.append(f"{keys:,} trigram sets, {used / 1e6:,.1f} MB")
            if kind == "users":
                views = UserViews(client, UserKeys(space))
                scan = UserViews(client, UserKeys(space), candidate_limit=0)

                async def users_page(term: str, on: UserViews = views) -> int:
                    return len((await on.list_page(ListUsersQuery(page_size=PAGE_SIZE, search=term))).users)

                ask: Callable[[str], Awaitable[int]] = users_page
                scan_ask: Callable[[str], Awaitable[int]] = lambda term: users_page(term, scan)  # noqa: E731
                common, starts = "smith", "emma.wilson1"
            else:
                order_views = OrderViews(client, OrderKeys(space))
                order_scan = OrderViews(client, OrderKeys(space), candidate_limit=0)

                async def orders_page(term: str, on: OrderViews = order_views) -> int:
                    return len((await on.search(SearchOrdersQuery(page_size=PAGE_SIZE, text=term))).orders)

                ask = orders_page

                async def scan_orders(term: str) -> int:
                    return await orders_page(term, order_scan)

                scan_ask = scan_orders
                common, starts = "smith", "emma.wilson1"
            for row, term in ((rare_row, RARE), (common_row, common), (prefix_row, starts)):
                p50, p99, found = await _latencies(functools.partial(ask, term), sizes.queries)
                row.value = p99
                row.notes.append(f"p50 {p50:.2f} ms; `{term}`: {found} on the first page")
            _, scan_p99, scan_found = await _latencies(lambda: scan_ask(RARE), max(5, sizes.queries // 20))
            rare_row.ceiling = scan_p99
            rare_row.notes.append(f"today's scan gave {scan_found} of the 3 on its first page")
        finally:
            await drop_keyspace(client, prefix)
            await client.aclose()
            await pool.close()
    return rows


async def measure_search(backing: Backing, sizes: SearchSizes, say: Callable[[str], None] | None = None) -> list[Row]:
    """Fill the search rows, users then orders, each size in turn."""
    speak = say or (lambda message: print(f"bench | {message}", file=sys.stderr, flush=True))
    rows: list[Row] = []
    for kind in ("users", "orders"):
        for n in sizes.sizes:
            rows.extend(await _measure_one(backing, kind, n, sizes, speak))
    return rows
