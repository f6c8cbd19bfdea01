"""Concurrency, crash recovery and leases: the saga against real Postgres and the real provider."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import grpc
import pytest

from tessera.common.v1.money_pb2 import Money
from tessera.payments.v1 import payment_provider_pb2 as pb
from tessera.payments.v1 import payment_provider_pb2_grpc as pb_grpc
from tests.integration.write_service.saga.support import (
    CALL_TIMEOUT_S,
    Settings,
    add_product,
    add_user,
    make_runner,
    order_row,
    payment,
    place_order,
    running_worker,
    saga_row,
    steps_of,
    stock,
    wait_sagas_settled,
    wait_until,
)
from write_service.saga import model
from write_service.saga.orchestrator import SAGA_COLUMNS, saga_from_row

pytestmark = pytest.mark.integration


async def test_concurrent_orders_never_oversell(
    db_pool: asyncpg.Pool[Any], database_url: str, provider: grpc.aio.Channel
) -> None:
    """40 orders for 2-3 units of a product with 50 in stock, driven by three workers at once."""
    customer = await add_user(db_pool)
    product, _ = await add_product(db_pool, 50)
    other, _ = await add_product(db_pool, 1000)
    quantities = [2 + i % 2 for i in range(40)]  # 100 units asked for, 50 available
    orders = await asyncio.gather(*(place_order(db_pool, customer, [(product, q), (other, 1)]) for q in quantities))
    minimum: list[int] = []

    async def watch_stock(stop: asyncio.Event) -> None:
        while not stop.is_set():
            minimum.append(await stock(db_pool, product))
            await asyncio.sleep(0.005)

    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_stock(stop))
    settings = Settings(concurrency=16)
    async with (
        running_worker(db_pool, database_url, provider, settings, "worker-a") as a,
        running_worker(db_pool, database_url, provider, settings, "worker-b") as b,
        running_worker(db_pool, database_url, provider, settings, "worker-c") as c,
    ):
        await wait_sagas_settled(db_pool, timeout=60)
    assert [w.stats.unexpected_errors for w in (a, b, c)] == [0, 0, 0]
    assert sum(w.stats.claimed for w in (a, b, c)) >= 40
    stop.set()
    await watcher
    rows = await db_pool.fetch("SELECT id, status FROM orders WHERE id = ANY($1::uuid[])", orders)
    confirmed = {row["id"] for row in rows if row["status"] == "confirmed"}
    rejected = {row["id"] for row in rows if row["status"] == "rejected"}
    assert len(confirmed) + len(rejected) == 40
    sold = sum(q for order_id, q in zip(orders, quantities, strict=True) if order_id in confirmed)
    left = await stock(db_pool, product)
    assert left >= 0
    assert min(minimum) >= 0
    assert sold + left == 50  # nothing oversold, nothing lost
    assert left < 2  # no order that would have fit was turned away
    assert await stock(db_pool, other) == 1000 - len(confirmed)
    reserved = await db_pool.fetchval(
        "SELECT coalesce(sum(quantity), 0) FROM stock_reservations WHERE product_id = $1 AND released_at IS NULL",
        product,
    )
    assert reserved == sold
    outcomes = await db_pool.fetch("SELECT DISTINCT step, outcome FROM saga_steps WHERE outcome <> 'succeeded'")
    assert {(r["step"], r["outcome"]) for r in outcomes} <= {("reserve_stock", "failed")}  # only rejections
    listing = await pb_grpc.PaymentProviderServiceStub(provider).ListPayments(
        pb.ListPaymentsRequest(), timeout=CALL_TIMEOUT_S
    )
    ours = [p for p in listing.payments if uuid.UUID(p.reference) in set(orders)]
    assert sorted(uuid.UUID(p.reference) for p in ours) == sorted(confirmed)
    assert all(p.captures == 1 for p in ours)


async def test_a_step_repeated_after_a_crash_charges_once(
    db_pool: asyncpg.Pool[Any], database_url: str, provider: grpc.aio.Channel
) -> None:
    """A worker authorized, then died before its transaction: the next worker repeats the call harmlessly."""
    customer = await add_user(db_pool)
    product, _ = await add_product(db_pool, 5, 700)
    order_id = await place_order(db_pool, customer, [(product, 1)])
    # A worker claims the saga and runs the reserve step, then dies holding its lease.
    await db_pool.execute(
        "UPDATE saga_executions SET locked_by = 'dead-worker', locked_until = now() + interval '1 minute'"
        " WHERE order_id = $1",
        order_id,
    )
    row = await db_pool.fetchrow(f"SELECT {SAGA_COLUMNS} FROM saga_executions WHERE order_id = $1", order_id)
    assert row is not None
    claimed = saga_from_row(row)
    after_reserve = await make_runner(db_pool, provider, Settings(), "dead-worker").run_step(claimed)
    assert after_reserve is not None
    assert after_reserve.current_step == "authorize_payment"
    saga = await saga_row(db_pool, order_id)
    assert saga["current_step"] == "authorize_payment"
    # The dead worker's Authorize reached the provider; its commit never happened.
    first = await pb_grpc.PaymentProviderServiceStub(provider).Authorize(
        pb.AuthorizeRequest(
            reference=str(order_id),
            amount=Money(currency_code="EUR", amount_minor=700),
            customer_id=str(customer),
            idempotency_key=model.idempotency_key(saga["id"], "authorize"),
        ),
        timeout=CALL_TIMEOUT_S,
    )
    assert first.approved
    await db_pool.execute(
        "UPDATE saga_executions SET locked_by = 'dead-worker', locked_until = now() - interval '1 second',"
        " next_attempt_at = now() WHERE id = $1",
        saga["id"],
    )
    async with running_worker(db_pool, database_url, provider) as worker:
        await wait_sagas_settled(db_pool)
    assert worker.stats.resumed_stale == 1
    assert (await order_row(db_pool, order_id))["status"] == "confirmed"
    paid = await payment(provider, order_id)
    assert paid is not None
    assert (paid.authorization_id, paid.state, paid.captures) == (first.authorization_id, pb.PAYMENT_STATE_CAPTURED, 1)
    assert await stock(db_pool, product) == 4


async def test_a_live_lease_is_respected_and_an_expired_one_is_taken_over(
    db_pool: asyncpg.Pool[Any], database_url: str, provider: grpc.aio.Channel
) -> None:
    customer = await add_user(db_pool)
    product, _ = await add_product(db_pool, 5)
    order_id = await place_order(db_pool, customer, [(product, 1)])
    saga = await saga_row(db_pool, order_id)
    # Another worker holds it for 1.5 s more (it is alive, or at least its lease is).
    await db_pool.execute(
        "UPDATE saga_executions SET locked_by = 'other-worker', locked_until = now() + interval '1.5 seconds'"
        " WHERE id = $1",
        saga["id"],
    )
    async with running_worker(db_pool, database_url, provider, Settings(poll_interval_s=0.1)) as worker:
        await asyncio.sleep(0.5)  # the worker polls several times meanwhile; the lease must hold
        assert (await saga_row(db_pool, order_id))["locked_by"] == "other-worker"
        assert await steps_of(db_pool, order_id) == []
        await wait_sagas_settled(db_pool, timeout=10)
    assert worker.stats.resumed_stale == 1
    assert (await order_row(db_pool, order_id))["status"] == "confirmed"


async def test_circuit_breaker_reschedules_without_spending_attempts(
    db_pool: asyncpg.Pool[Any], database_url: str, provider: grpc.aio.Channel
) -> None:
    from tests.integration.write_service.saga.support import configure_provider

    customer = await add_user(db_pool)
    product, _ = await add_product(db_pool, 50)
    await configure_provider(provider, unavailable_rate=1.0)
    orders = [await place_order(db_pool, customer, [(product, 1)]) for _ in range(6)]
    settings = Settings(max_attempts=3, breaker_threshold=2, breaker_cooldown_s=0.5, backoff_base_ms=5)
    async with running_worker(db_pool, database_url, provider, settings) as worker:

        async def some_rescheduled() -> bool:
            return bool(worker._runner._provider.breaker.opened_count >= 1)  # type: ignore[attr-defined]

        await wait_until(some_rescheduled, 10, "the breaker to open")
        await configure_provider(provider)
        await wait_sagas_settled(db_pool, timeout=20)
    statuses = await db_pool.fetch("SELECT status FROM orders WHERE id = ANY($1::uuid[])", orders)
    failed = await db_pool.fetchval("SELECT count(*) FROM saga_executions WHERE status = 'failed'")
    # Six sagas against a dead provider with a cap of 3 attempts: only the calls that reached the
    # provider (2 per breaker opening) spent attempts; the rest waited for the breaker.
    assert failed == 0
    assert [r["status"] for r in statuses] == ["confirmed"] * 6
