"""Crash recovery of the order saga: kill -9 the saga worker mid-saga, and separately the write
service while orders are being placed; afterwards every saga reaches a final state, stock balances
and every payment is settled exactly once. The test prints its counts."""

from __future__ import annotations

import asyncio
import functools
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from tessera.payments.v1 import payment_provider_pb2 as pay
from tessera_client import DeadlineExceeded, FailedPrecondition, TesseraClient, Unavailable
from tests.e2e.conftest import e2e_config, running_stack
from tests.e2e.test_order_saga import SAGA_ENV, Shop

pytestmark = pytest.mark.e2e

INITIAL_STOCK = 40
CRASH_ENV = {
    **SAGA_ENV,
    "SAGA_MAX_ATTEMPTS": "20",
    "SAGA_LEASE_S": "2",  # a killed worker's sagas are stale after 2 s
    "SAGA_CONCURRENCY": "8",
}


@dataclass
class Ledger:
    """What the test did, to check the stack against."""

    products: dict[str, int] = field(default_factory=dict)  # product id -> initial + restocks
    skus: dict[str, str] = field(default_factory=dict)  # product id -> sku
    placed: int = 0
    place_errors: int = 0  # failed command attempts while placing, each retried by the client with its key
    cancel_requests: int = 0


@pytest.fixture(scope="module")
async def shop(e2e_database: str, redis_server_url: str, e2e_prefix: str, e2e_logs: Path) -> AsyncIterator[Shop]:
    """The stack with one saga worker whose leases run out after 2 s."""
    config = e2e_config(
        e2e_database, redis_server_url, e2e_prefix, e2e_logs, saga_env=CRASH_ENV, relays=1, read_ports=(0,)
    )
    async with running_stack(config, redis_server_url) as stack:
        pool: asyncpg.Pool[Any] = await asyncpg.create_pool(e2e_database, min_size=1, max_size=4)
        # A long deadline: a command waits (and retries with its key) across a write-service restart.
        tessera = TesseraClient(stack.write_address, stack.read_addresses, timeout=30)
        provider = grpc.aio.insecure_channel(stack.provider_address)
        try:
            yield Shop(stack, pool, tessera, provider)
        finally:
            await tessera.close()
            await provider.close()
            await pool.close()


async def _catalog(shop: Shop, ledger: Ledger, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        product_id, sku = await shop.product(INITIAL_STOCK, 900)
        ledger.products[product_id] = INITIAL_STOCK
        ledger.skus[product_id] = sku
        ids.append(product_id)
    return ids


async def _place_many(
    shop: Shop, ledger: Ledger, customers: list[str], products: list[str], count: int, rng: random.Random
) -> list[str]:
    """Place `count` orders, 4 at a time; cancel about one in six right after placing it."""
    placed: list[str] = []
    gate = asyncio.Semaphore(4)

    async def one() -> None:
        items = rng.sample(products, rng.choice((1, 2)))
        customer = rng.choice(customers)
        cancel = rng.random() < 1 / 6
        lines = [(ledger.skus[p], rng.randint(1, 4)) for p in items]
        key = f"crash-{uuid.uuid4()}"
        async with gate:
            # The client retries a failed PlaceOrder with this one idempotency key until its deadline,
            # so an order whose reply was lost in the crash is not placed twice.
            order_id = await shop.place(customer, *lines, idempotency_key=key)
            ledger.placed += 1
            placed.append(order_id)
            if cancel:
                await asyncio.sleep(rng.random() * 0.3)
                try:
                    await shop.cancel(order_id, "crash test cancel")
                    ledger.cancel_requests += 1
                except (Unavailable, DeadlineExceeded, FailedPrecondition):
                    pass  # too late (shipped never happens here) or the write service stayed down

    retries_before = shop.tessera.command_retries  # this client serves only this test's commands now
    await asyncio.gather(*(one() for _ in range(count)))
    ledger.place_errors += shop.tessera.command_retries - retries_before
    return placed


async def _until(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {within} s")
        await asyncio.sleep(0.01)


async def _finished_since(shop: Shop, before: set[str], count: int) -> bool:
    rows = await shop.pool.fetch(
        "SELECT order_id::text AS order_id, status FROM saga_executions WHERE status NOT IN ('running', 'compensating')"
    )
    return sum(1 for row in rows if row["order_id"] not in before) >= count


async def _all_final(shop: Shop, within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        active = await shop.pool.fetchval(
            "SELECT count(*) FROM saga_executions WHERE status IN ('running', 'compensating')"
        )
        if active == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{active} sagas still active after {within} s")
        await asyncio.sleep(0.1)


def _resumptions(shop: Shop) -> int:
    """How often the stack's saga workers resumed a stale saga so far (from their logs)."""
    return sum(log.read_text().count("resuming a stale saga") for log in shop.stack.log_dir.glob("saga-*.log"))


async def _order_ids(shop: Shop) -> set[str]:
    return {str(row["id"]) for row in await shop.pool.fetch("SELECT id FROM orders")}


async def _audit(shop: Shop, ledger: Ledger, label: str, before: set[str], resumed_before: int) -> Counter[str]:
    """Check every invariant over every order in the database; print and return this scenario's counts."""
    sagas = Counter[str]()
    for row in await shop.pool.fetch("SELECT status FROM saga_executions"):
        sagas[row["status"]] += 1
    assert sagas["failed"] == 0, "no saga should need an operator here"
    assert set(sagas) <= {"completed"}
    statuses = {str(row["id"]): row["status"] for row in await shop.pool.fetch("SELECT id, status FROM orders")}
    assert len(statuses) == sum(sagas.values())  # every order has its saga
    assert len([o for o in statuses if o not in before]) == ledger.placed  # none placed twice, none lost
    # Stock: what the test put in, minus what confirmed orders hold; never negative.
    for product_id, supplied in ledger.products.items():
        held = await shop.pool.fetchval(
            "SELECT coalesce(sum(l.quantity), 0) FROM order_lines l JOIN orders o ON o.id = l.order_id"
            " WHERE l.product_id = $1 AND o.status = 'confirmed'",
            uuid.UUID(product_id),
        )
        reserved = await shop.pool.fetchval(
            "SELECT coalesce(sum(quantity), 0) FROM stock_reservations WHERE product_id = $1 AND released_at IS NULL",
            uuid.UUID(product_id),
        )
        left = await shop.stock(product_id)
        assert left >= 0
        assert left == supplied - held, (product_id, supplied, held, left)
        assert reserved == held
    # Payments: confirmed = captured once; cancelled = never charged or refunded; rejected = never asked.
    payments = await shop.payments()
    for order_id, status in statuses.items():
        paid = payments.get(order_id)
        if status == "confirmed":
            assert paid is not None
            assert (paid.state, paid.captures, paid.refunds) == (pay.PAYMENT_STATE_CAPTURED, 1, 0), order_id
        elif status == "cancelled":
            if paid is not None:
                assert paid.state in (
                    pay.PAYMENT_STATE_VOIDED,
                    pay.PAYMENT_STATE_DECLINED,
                    pay.PAYMENT_STATE_REFUNDED,
                ), (order_id, paid)
                assert paid.captures == paid.refunds <= 1, (order_id, paid)
        else:
            assert status == "rejected", (order_id, status)
            assert paid is None, order_id
    assert all(p.captures <= 1 for p in payments.values())
    ours = [uuid.UUID(order_id) for order_id in statuses if order_id not in before]
    orders = Counter(status for order_id, status in statuses.items() if order_id not in before)
    retried = await shop.pool.fetchval(
        "SELECT count(*) FROM saga_steps s JOIN saga_executions e ON e.id = s.saga_id"
        " WHERE s.outcome = 'retrying' AND e.order_id = ANY($1::uuid[])",
        ours,
    )
    resumed = _resumptions(shop) - resumed_before
    print(
        f"\n[{label}] sagas={len(ours)} confirmed={orders['confirmed']} cancelled={orders['cancelled']} "
        f"rejected={orders['rejected']} retried_steps={retried} resumed_stale_sagas={resumed} "
        f"place_errors={ledger.place_errors} cancel_requests={ledger.cancel_requests}"
    )
    counts = Counter(orders)
    counts["retried_steps"] = retried
    counts["resumed_stale"] = resumed
    return counts


async def test_kill_the_saga_worker_mid_saga(shop: Shop) -> None:
    rng = random.Random(20261122)
    ledger = Ledger()
    before, resumed_before = await _order_ids(shop), _resumptions(shop)
    products = await _catalog(shop, ledger, 3)
    customers = [await shop.customer() for _ in range(5)]
    decliner = await shop.customer()
    # Latency keeps every saga in flight long enough for the kills to land between its steps; the
    # random failures (drawn from a seeded generator) make some steps retry on top.
    await shop.configure(
        latency_ms=120,
        decline_customer_ids=[decliner],
        unavailable_rate=0.08,
        timeout_rate=0.04,
        seed=11,
    )
    try:
        placing = asyncio.create_task(_place_many(shop, ledger, [*customers, decliner], products, 60, rng))
        for finished in (10, 30):
            # Kill once that many of this run's sagas have finished, while others are mid-way.
            await _until(functools.partial(_finished_since, shop, before, finished), 60, f"{finished} finished")
            worker = shop.stack.saga_workers[0]
            worker.kill()  # SIGKILL: no shutdown, its leases stay until they run out
            await asyncio.to_thread(worker.start)
            await worker.wait_healthy_async(30)
        await shop.restock(products[0], 10)
        ledger.products[products[0]] += 10
        await placing
        await _all_final(shop, 90)
    finally:
        await shop.configure()
    counts = await _audit(shop, ledger, "saga worker killed twice", before, resumed_before)
    assert counts["confirmed"] > 0
    assert counts["cancelled"] > 0
    assert counts["resumed_stale"] > 0  # the kills did land mid-saga


async def test_kill_the_write_service_while_placing(shop: Shop) -> None:
    rng = random.Random(7)
    ledger = Ledger()
    before, resumed_before = await _order_ids(shop), _resumptions(shop)
    products = await _catalog(shop, ledger, 2)
    customers = [await shop.customer() for _ in range(4)]
    await shop.configure(latency_ms=20)
    try:
        placing = asyncio.create_task(_place_many(shop, ledger, customers, products, 50, rng))

        async def some_placed() -> bool:
            return ledger.placed >= 10

        await _until(some_placed, 60, "the first orders")  # then kill it in the middle of the placing
        write = shop.stack.write
        assert write is not None
        write.kill()
        await asyncio.to_thread(write.start)
        await write.wait_healthy_async(30)
        await placing
        await _all_final(shop, 90)
    finally:
        await shop.configure()
    # Earlier tests' orders are in the same database; their products are not in this ledger.
    counts = await _audit(shop, ledger, "write service killed while placing", before, resumed_before)
    assert counts["confirmed"] > 0
    assert ledger.place_errors > 0  # the kill did land while orders were being placed
