"""The saga's per-step fallback: two real payment provider processes, the primary down."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import grpc
import pytest

from devstack.supervisor import ServiceProcess
from tessera.payments.v1 import payment_provider_pb2 as pb
from tests.integration.write_service.saga.conftest import configured_channels, provider_processes
from tests.integration.write_service.saga.support import (
    Settings,
    add_product,
    add_user,
    cancel_order,
    configure_provider,
    order_row,
    payment,
    place_order,
    running_worker,
    saga_row,
    stock,
    wait_sagas_settled,
    wait_until,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def secondary_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """A second `python -m payment_provider`, on its own free port with its own ledger."""
    yield from provider_processes(tmp_path_factory, "payment-provider-secondary")


@pytest.fixture
async def secondary(secondary_process: ServiceProcess) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the secondary provider, with every injected failure switched off."""
    async for channel in configured_channels(secondary_process):
        yield channel


async def _steps(pool: asyncpg.Pool[Any], order_id: uuid.UUID) -> list[tuple[str, str, str]]:
    rows = await pool.fetch(
        "SELECT s.step, s.outcome, s.detail FROM saga_steps AS s JOIN saga_executions AS e ON e.id = s.saga_id"
        " WHERE e.order_id = $1 ORDER BY s.id",
        order_id,
    )
    return [(row["step"], row["outcome"], row["detail"]) for row in rows]


async def test_an_open_breaker_authorizes_through_the_secondary_and_settles_there(
    db_pool: asyncpg.Pool[Any], database_url: str, provider: grpc.aio.Channel, secondary: grpc.aio.Channel
) -> None:
    """Primary down: once its breaker opens, orders are paid at the secondary, and refunded there."""
    customer = await add_user(db_pool)
    product, _ = await add_product(db_pool, 100, 500)
    await configure_provider(provider, unavailable_rate=1.0)
    orders = [await place_order(db_pool, customer, [(product, 1)]) for _ in range(4)]
    # The breaker opens after 2 failures and stays open for the whole test.
    settings = Settings(breaker_threshold=2, breaker_cooldown_s=60.0, max_attempts=5, backoff_base_ms=5)
    async with running_worker(db_pool, database_url, provider, settings, secondary=secondary):
        await wait_sagas_settled(db_pool, timeout=20)
        assert [(await order_row(db_pool, o))["status"] for o in orders] == ["confirmed"] * 4
        refunded = orders[0]
        await cancel_order(db_pool, refunded, "changed my mind")

        async def settled() -> bool:
            return bool((await saga_row(db_pool, refunded))["status"] == "completed")

        await wait_until(settled, 20, "the cancelled order's compensation")
    await configure_provider(provider)
    for order_id in orders:
        paid = await payment(secondary, order_id)
        assert paid is not None
        assert paid.captures == 1
        assert await payment(provider, order_id) is None  # the primary never saw it
        context = json.loads((await saga_row(db_pool, order_id))["context"])
        assert context["provider"] == "secondary"
        authorized = [d for s, o, d in await _steps(db_pool, order_id) if (s, o) == ("authorize_payment", "succeeded")]
        assert len(authorized) == 1
        assert authorized[0].endswith("through the secondary provider")
    refund = await payment(secondary, refunded)
    assert refund is not None
    assert (refund.state, refund.refunds) == (pb.PAYMENT_STATE_REFUNDED, 1)
    assert (await order_row(db_pool, refunded))["status"] == "cancelled"
    assert await stock(db_pool, product) == 100 - 3


async def test_without_a_secondary_an_open_breaker_still_waits(
    db_pool: asyncpg.Pool[Any], database_url: str, provider: grpc.aio.Channel
) -> None:
    """No secondary configured: the saga waits for the primary as before (no attempt spent)."""
    customer = await add_user(db_pool)
    product, _ = await add_product(db_pool, 10)
    await configure_provider(provider, unavailable_rate=1.0)
    order_id = await place_order(db_pool, customer, [(product, 1)])
    settings = Settings(breaker_threshold=1, breaker_cooldown_s=0.3, max_attempts=3, backoff_base_ms=5)
    async with running_worker(db_pool, database_url, provider, settings):

        async def waiting() -> bool:
            return bool((await saga_row(db_pool, order_id))["current_step"] == "authorize_payment")

        await wait_until(waiting, 10, "the saga to reach the payment step")
        await configure_provider(provider)
        await wait_sagas_settled(db_pool, timeout=20)
    assert (await order_row(db_pool, order_id))["status"] == "confirmed"
    assert json.loads((await saga_row(db_pool, order_id))["context"])["provider"] == "primary"
