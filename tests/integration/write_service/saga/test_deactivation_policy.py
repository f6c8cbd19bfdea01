"""The orders' policy on UserDeactivated, end to end: Postgres, the saga worker, a real payment provider."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import grpc
import pytest

from tests.integration.write_service.saga.support import (
    Settings,
    add_product,
    add_user,
    configure_provider,
    order_row,
    place_order,
    product_events_of,
    running_worker,
    saga_row,
    steps_of,
    stock,
    wait_sagas_settled,
    wait_until,
)
from tests.unit.write_service import helpers
from write_service.service_layer.messagebus import CommandBus

pytestmark = pytest.mark.integration


async def test_deactivating_a_customer_cancels_their_unpaid_orders_through_the_saga(
    db_pool: asyncpg.Pool[Any], database_url: str, provider: grpc.aio.Channel, pg_bus: CommandBus
) -> None:
    customer = await add_user(db_pool)
    product, _ = await add_product(db_pool, 10)
    # One order gets its stock reserved, then waits for a provider that is down.
    reserved = await place_order(db_pool, customer, [(product, 3)])
    await configure_provider(provider, unavailable_rate=1.0)
    waiting = Settings(breaker_threshold=1, breaker_cooldown_s=60.0)
    async with running_worker(db_pool, database_url, provider, waiting):

        async def at_payment() -> bool:
            return bool((await saga_row(db_pool, reserved))["current_step"] == "authorize_payment")

        await wait_until(at_payment, 10, "the first order's stock to be reserved")
    assert await stock(db_pool, product) == 7
    # The other is placed while no saga worker runs: still pending.
    pending = await place_order(db_pool, customer, [(product, 2)])
    await configure_provider(provider)

    await pg_bus.dispatch(helpers.deactivate(customer, reason="account closed"), helpers.meta())

    for order_id in (reserved, pending):
        row = await order_row(db_pool, order_id)
        assert (row["status"], row["reason"], row["cancelled_by"]) == (
            "cancelled",
            "customer deactivated: account closed",
            "system",
        )
        assert (await saga_row(db_pool, order_id))["status"] == "compensating"
    async with running_worker(db_pool, database_url, provider):
        await wait_sagas_settled(db_pool)
    assert await stock(db_pool, product) == 10  # the reserved units came back
    assert await product_events_of(db_pool, reserved) == ["StockReserved", "StockReleased"]
    assert await product_events_of(db_pool, pending) == []
    for order_id in (reserved, pending):
        saga = await saga_row(db_pool, order_id)
        assert saga["status"] == "completed"
        assert json.loads(saga["context"])["payment"] == "voided"
        assert ("release_stock", "compensate", "succeeded") in await steps_of(db_pool, order_id)
        assert (await order_row(db_pool, order_id))["status"] == "cancelled"
