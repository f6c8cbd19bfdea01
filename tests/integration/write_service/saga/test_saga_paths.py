"""The order saga against real Postgres and the real payment provider process: every path."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import grpc
import pytest

from tessera.payments.v1 import payment_provider_admin_pb2 as admin_pb
from tessera.payments.v1 import payment_provider_pb2 as pb
from tests.integration.write_service.saga.support import (
    HeldAuthorization,
    Settings,
    add_product,
    add_user,
    cancel_order,
    configure_provider,
    order_events_of,
    order_row,
    payment,
    place_order,
    product_events_of,
    running_worker,
    saga_row,
    steps_of,
    stock,
    wait_sagas_settled,
)
from write_service.saga.operations import retry_saga
from write_service.saga.provider import PaymentProvider

pytestmark = pytest.mark.integration


async def test_happy_path_confirms_decrements_and_captures_once(
    db_pool: asyncpg.Pool[Any], database_url: str, provider: grpc.aio.Channel
) -> None:
    customer = await add_user(db_pool)
    (apple, _), (pear, _) = await add_product(db_pool, 10, 250), await add_product(db_pool, 5, 1000)
    order_id = await place_order(db_pool, customer, [(apple, 3), (pear, 2)])
    async with running_worker(db_pool, database_url, provider):
        await wait_sagas_settled(db_pool)
    assert (await order_row(db_pool, order_id))["status"] == "confirmed"
    assert (await stock(db_pool, apple), await stock(db_pool, pear)) == (7, 3)
    paid = await payment(provider, order_id)
    assert paid is not None
    assert (paid.state, paid.captures, paid.amount.amount_minor) == (pb.PAYMENT_STATE_CAPTURED, 1, 2750)
    assert await order_events_of(db_pool, order_id) == [
        ("OrderPlaced", 1),
        ("PaymentAuthorized", 2),
        ("PaymentCaptured", 3),
        ("OrderConfirmed", 4),
    ]
    assert (await order_row(db_pool, order_id))["version"] == 4
    assert await product_events_of(db_pool, order_id) == ["StockReserved", "StockReserved"]
    saga = await saga_row(db_pool, order_id)
    assert (saga["status"], saga["current_step"], saga["locked_by"]) == ("completed", "capture_and_confirm", None)
    assert await steps_of(db_pool, order_id) == [
        ("reserve_stock", "act", "succeeded"),
        ("authorize_payment", "act", "succeeded"),
        ("capture_and_confirm", "act", "succeeded"),
    ]
    versions = await db_pool.fetch("SELECT version FROM products WHERE id = ANY($1::uuid[])", [apple, pear])
    assert sorted(r["version"] for r in versions) == [2, 2]


async def test_out_of_stock_rejects_with_the_sku_and_touches_no_stock(
    db_pool: asyncpg.Pool[Any], database_url: str, provider: grpc.aio.Channel
) -> None:
    customer = await add_user(db_pool)
    (plenty, _), (scarce, scarce_sku) = await add_product(db_pool, 10), await add_product(db_pool, 1)
    order_id = await place_order(db_pool, customer, [(plenty, 2), (scarce, 2)])
    async with running_worker(db_pool, database_url, provider):
        await wait_sagas_settled(db_pool)
    order = await order_row(db_pool, order_id)
    assert order["status"] == "rejected"
    assert f"sku {scarce_sku} (requested 2, available 1)" in order["reason"]
    assert (await stock(db_pool, plenty), await stock(db_pool, scarce)) == (10, 1)
    assert await order_events_of(db_pool, order_id) == [
        ("OrderPlaced", 1),
        ("StockReservationFailed", 2),
        ("OrderRejected", 3),
    ]
    assert await payment(provider, order_id) is None  # never asked to pay
    assert (await saga_row(db_pool, order_id))["status"] == "completed"


async def test_discontinued_product_rejects(
    db_pool: asyncpg.Pool[Any], database_url: str, provider: grpc.aio.Channel
) -> None:
    customer = await add_user(db_pool)
    gone, gone_sku = await add_product(db_pool, 10, discontinued=True)
    order_id = await place_order(db_pool, customer, [(gone, 1)])
    async with running_worker(db_pool, database_url, provider):
        await wait_sagas_settled(db_pool)
    order = await order_row(db_pool, order_id)
    assert (order["status"], order["reason"]) == ("rejected", f"discontinued product: {gone_sku}")
    assert await stock(db_pool, gone) == 10


async def test_declined_payment_cancels_and_releases_stock(
    db_pool: asyncpg.Pool[Any], database_url: str, provider: grpc.aio.Channel
) -> None:
    customer = await add_user(db_pool)
    product, _ = await add_product(db_pool, 4)
    await configure_provider(provider, decline_customer_ids=[str(customer)])
    order_id = await place_order(db_pool, customer, [(product, 3)])
    async with running_worker(db_pool, database_url, provider):
        await wait_sagas_settled(db_pool)
    order = await order_row(db_pool, order_id)
    assert order["status"] == "cancelled"
    assert order["cancelled_by"] == "system"
    assert order["reason"].startswith("payment declined: ")
    assert await stock(db_pool, product) == 4
    assert await order_events_of(db_pool, order_id) == [
        ("OrderPlaced", 1),
        ("PaymentDeclined", 2),
        ("OrderCancelled", 3),
    ]
    assert await product_events_of(db_pool, order_id) == ["StockReserved", "StockReleased"]
    released = await db_pool.fetchval(
        "SELECT released_at IS NOT NULL FROM stock_reservations WHERE order_id = $1", order_id
    )
    assert released is True
    paid = await payment(provider, order_id)
    assert paid is not None
    assert (paid.state, paid.captures) == (pb.PAYMENT_STATE_DECLINED, 0)


async def test_transient_failures_are_retried_then_confirmed(
    db_pool: asyncpg.Pool[Any], database_url: str, provider: grpc.aio.Channel
) -> None:
    customer = await add_user(db_pool)
    product, _ = await add_product(db_pool, 4)
    order_id = await place_order(db_pool, customer, [(product, 1)])
    await configure_provider(
        provider,
        scripted_failures=[
            admin_pb.ScriptedFailure(
                reference=str(order_id),
                method=admin_pb.PROVIDER_METHOD_AUTHORIZE,
                kind=admin_pb.FAILURE_KIND_UNAVAILABLE,
                times=2,
            ),
            admin_pb.ScriptedFailure(
                reference=str(order_id),
                method=admin_pb.PROVIDER_METHOD_CAPTURE,
                kind=admin_pb.FAILURE_KIND_TIMEOUT_APPLIED,
                times=1,
            ),
        ],
    )
    async with running_worker(db_pool, database_url, provider, Settings(timeout_s=0.3)):
        await wait_sagas_settled(db_pool)
    assert (await order_row(db_pool, order_id))["status"] == "confirmed"
    paid = await payment(provider, order_id)
    assert paid is not None
    assert (paid.state, paid.captures) == (pb.PAYMENT_STATE_CAPTURED, 1)  # the timed-out capture counted once
    assert await steps_of(db_pool, order_id) == [
        ("reserve_stock", "act", "succeeded"),
        ("authorize_payment", "act", "retrying"),
        ("authorize_payment", "act", "retrying"),
        ("authorize_payment", "act", "succeeded"),
        ("capture_and_confirm", "act", "retrying"),
        ("capture_and_confirm", "act", "succeeded"),
    ]
    assert await stock(db_pool, product) == 3


async def test_attempt_cap_parks_the_saga_and_retry_completes_it(
    db_pool: asyncpg.Pool[Any], database_url: str, provider: grpc.aio.Channel
) -> None:
    customer = await add_user(db_pool)
    product, _ = await add_product(db_pool, 4)
    await configure_provider(provider, unavailable_rate=1.0)
    order_id = await place_order(db_pool, customer, [(product, 2)])
    async with running_worker(db_pool, database_url, provider, Settings(max_attempts=3)):
        await wait_sagas_settled(db_pool)
        saga = await saga_row(db_pool, order_id)
        assert (saga["status"], saga["current_step"], saga["attempts"]) == ("failed", "authorize_payment", 3)
        assert "UNAVAILABLE" in saga["last_error"]
        assert (await order_row(db_pool, order_id))["status"] == "reserved"  # stock stays held meanwhile
        assert await stock(db_pool, product) == 2

        await configure_provider(provider)
        record = await retry_saga(db_pool, saga["id"], "operator")
        assert (record.status, record.attempts) == ("running", 0)
        await wait_sagas_settled(db_pool)
    assert (await order_row(db_pool, order_id))["status"] == "confirmed"
    outcomes = [outcome for step, _, outcome in await steps_of(db_pool, order_id) if step == "authorize_payment"]
    assert outcomes == ["retrying", "retrying", "failed", "retrying", "succeeded"]


async def test_cancel_of_a_confirmed_order_releases_stock_and_refunds(
    db_pool: asyncpg.Pool[Any], database_url: str, provider: grpc.aio.Channel
) -> None:
    customer = await add_user(db_pool)
    product, _ = await add_product(db_pool, 5)
    order_id = await place_order(db_pool, customer, [(product, 5)])
    async with running_worker(db_pool, database_url, provider):
        await wait_sagas_settled(db_pool)
        assert (await order_row(db_pool, order_id))["status"] == "confirmed"
        assert await stock(db_pool, product) == 0
        await cancel_order(db_pool, order_id)
        await wait_sagas_settled(db_pool)
    assert await stock(db_pool, product) == 5
    paid = await payment(provider, order_id)
    assert paid is not None
    assert (paid.state, paid.captures, paid.refunds) == (pb.PAYMENT_STATE_REFUNDED, 1, 1)
    events = await order_events_of(db_pool, order_id)
    assert [name for name, _ in events][-1] == "PaymentRefunded"
    assert [v for _, v in events] == list(range(1, len(events) + 1))
    # The row's version counts the order's events, the refund included (expected_version relies on it).
    assert (await order_row(db_pool, order_id))["version"] == len(events)
    assert await product_events_of(db_pool, order_id) == ["StockReserved", "StockReleased"]
    assert (await order_row(db_pool, order_id))["cancelled_by"] == "tester"  # the caller's cancellation stands


async def test_a_refund_whose_answer_was_lost_is_recorded_once(
    db_pool: asyncpg.Pool[Any], database_url: str, provider: grpc.aio.Channel
) -> None:
    customer = await add_user(db_pool)
    product, _ = await add_product(db_pool, 3)
    order_id = await place_order(db_pool, customer, [(product, 1)])
    async with running_worker(db_pool, database_url, provider, Settings(timeout_s=0.3)):
        await wait_sagas_settled(db_pool)
        assert (await order_row(db_pool, order_id))["status"] == "confirmed"
        # The refund takes effect at the provider, but its answer never reaches the worker.
        await configure_provider(
            provider,
            scripted_failures=[
                admin_pb.ScriptedFailure(
                    reference=str(order_id),
                    method=admin_pb.PROVIDER_METHOD_REFUND,
                    kind=admin_pb.FAILURE_KIND_TIMEOUT_APPLIED,
                    times=1,
                )
            ],
        )
        await cancel_order(db_pool, order_id)
        await wait_sagas_settled(db_pool)
    paid = await payment(provider, order_id)
    assert paid is not None
    assert (paid.state, paid.captures, paid.refunds) == (pb.PAYMENT_STATE_REFUNDED, 1, 1)
    events = [name for name, _ in await order_events_of(db_pool, order_id)]
    # The read side learns of the refund (paid → false) exactly once, although the provider refunded
    # before the retry asked it again.
    assert events.count("PaymentRefunded") == 1
    assert events[-1] == "PaymentRefunded"


async def test_cancel_before_the_saga_ran_voids_the_reference(
    db_pool: asyncpg.Pool[Any], database_url: str, provider: grpc.aio.Channel
) -> None:
    customer = await add_user(db_pool)
    product, _ = await add_product(db_pool, 5)
    order_id = await place_order(db_pool, customer, [(product, 2)])
    await cancel_order(db_pool, order_id)
    async with running_worker(db_pool, database_url, provider):
        await wait_sagas_settled(db_pool)
    assert await stock(db_pool, product) == 5
    paid = await payment(provider, order_id)
    assert paid is not None
    assert paid.state == pb.PAYMENT_STATE_VOIDED  # a late authorization would now be refused
    assert await steps_of(db_pool, order_id) == [
        ("release_stock", "compensate", "succeeded"),
        ("settle_payment", "compensate", "succeeded"),
    ]
    assert json.loads((await saga_row(db_pool, order_id))["context"])["payment"] == "voided"


async def test_cancel_while_authorizing_replans_and_voids(
    db_pool: asyncpg.Pool[Any], database_url: str, provider: grpc.aio.Channel
) -> None:
    customer = await add_user(db_pool)
    product, _ = await add_product(db_pool, 5)
    order_id = await place_order(db_pool, customer, [(product, 2)])
    held: list[HeldAuthorization] = []

    def hold(inner: PaymentProvider) -> PaymentProvider:
        held.append(HeldAuthorization(inner))
        return held[0]

    async with running_worker(db_pool, database_url, provider, wrap=hold):
        await asyncio.wait_for(held[0].authorized.wait(), 10)  # the provider has authorized
        await cancel_order(db_pool, order_id)  # committed before the step's transaction
        held[0].release.set()
        await wait_sagas_settled(db_pool)
    assert await stock(db_pool, product) == 5
    paid = await payment(provider, order_id)
    assert paid is not None
    assert (paid.state, paid.captures) == (pb.PAYMENT_STATE_VOIDED, 0)
    context = json.loads((await saga_row(db_pool, order_id))["context"])
    assert context["payment"] == "voided"
    assert context["authorization_id"] == paid.authorization_id  # noted by the replanned step
    names = [name for name, _ in await order_events_of(db_pool, order_id)]
    assert "PaymentAuthorized" not in names  # the step lost the race and wrote no forward effects
    assert names[-1] == "PaymentVoided"
