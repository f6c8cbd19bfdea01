"""A Postgres primary lost and its streaming standby promoted, under a command workload.

The stack runs on a multi-host URL (`target_session_attrs=read-write`), so every process
finds the promoted standby by itself. The workload sends idempotency keys and retries
retryable answers, so a command caught by the switch is retried until it takes effect once.

- Synchronous replication: the standby has every acknowledged commit, so the failover must
  lose nothing; every check of the other scenarios holds.
- Asynchronous replication, with the standby held back for a while before the crash: the
  last acknowledged commands never reach it. They are reported (`acked_lost`), and the
  replicas, which had already applied some of their events, must notice that the log went
  back under them, rebuild, and never again serve what no longer exists
  (`served_absent_users`, `diverged_views`).

Both also place an order after the promotion and wait for the saga workers to settle it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from devstack.chaos import ChaosStack, head_position
from tessera.catalog.v1 import catalog_command_service_pb2 as catalog
from tessera.catalog.v1 import catalog_command_service_pb2_grpc as catalog_grpc
from tessera.common.v1.money_pb2 import Money
from tessera.orders.v1 import order_command_service_pb2 as orders
from tessera.orders.v1 import order_command_service_pb2_grpc as orders_grpc
from tessera.orders.v1 import order_pb2
from tessera.users.v1 import user_command_service_pb2 as users
from tessera.users.v1 import user_command_service_pb2_grpc as users_grpc
from tests.chaos.faults import recovery, sleep_unless
from tests.chaos.report import ChaosReport
from tests.chaos.scenario import Scenario, run_scenario
from tests.chaos.workload import Workload

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]

# The schedule, not the count, bounds the run: the workload stops AFTER_PROMOTION_S after the promotion.
COMMANDS = 50_000
HOLD_BACK_S = 2.0
AFTER_PROMOTION_S = 3.0
SAGA_TIMEOUT_S = 60.0
SETTLED = ("confirmed", "rejected", "cancelled")


async def _call(method: Any, request: Any, timeout_s: float) -> Any:
    """Call until it succeeds or `timeout_s` runs out, retrying what a switch of primary answers."""
    deadline = time.monotonic() + timeout_s
    key = secrets.token_hex(8)
    while True:
        try:
            return await method(request, metadata=[("idempotency-key", key)], timeout=5.0)
        except grpc.aio.AioRpcError as error:
            retryable = error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            if not retryable or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def order_settles(stack: ChaosStack) -> dict[str, Any]:
    """A customer, a product and an order placed on the new primary; seconds until the saga settles it."""
    started = time.monotonic()
    run = secrets.token_hex(3)
    async with grpc.aio.insecure_channel(stack.services.write_address) as channel:
        customer = await _call(
            users_grpc.UserCommandServiceStub(channel).RegisterUser,
            users.RegisterUserRequest(
                email=f"failover-{run}@example.com",
                username=f"failover{run}",
                password="correct horse battery staple",
                full_name="Failover Customer",
            ),
            SAGA_TIMEOUT_S,
        )
        sku = f"FAILOVER-{run}".upper()
        await _call(
            catalog_grpc.CatalogCommandServiceStub(channel).AddProduct,
            catalog.AddProductRequest(
                sku=sku, name="Failover item", price=Money(currency_code="EUR", amount_minor=500), initial_stock=10
            ),
            SAGA_TIMEOUT_S,
        )
        placed = await _call(
            orders_grpc.OrderCommandServiceStub(channel).PlaceOrder,
            orders.PlaceOrderRequest(
                customer_id=customer.user_id,
                items=[orders.OrderItem(sku=sku, quantity=2)],
                shipping_address=order_pb2.Address(
                    recipient="Failover",
                    line1="1 Standby Street",
                    city="Berlin",
                    postal_code="10115",
                    country_code="DE",
                ),
            ),
            SAGA_TIMEOUT_S,
        )
    status = None
    while time.monotonic() - started < SAGA_TIMEOUT_S:
        try:
            conn = await asyncpg.connect(stack.database_url, timeout=2)
            try:
                status = await conn.fetchval("SELECT status FROM orders WHERE id = $1::uuid", placed.order_id)
            finally:
                await conn.close()
        except (OSError, TimeoutError, asyncpg.PostgresError):
            status = None
        if status in SETTLED:
            return {"order_status": status, "order_settled_s": round(time.monotonic() - started, 2)}
        await asyncio.sleep(0.1)
    return {"order_status": status, "order_settled_s": None}


def failover(hold_back_s: float) -> Any:
    """kill -9 of the primary once the workload is under way (the standby held back `hold_back_s` first)."""

    async def fault(stack: ChaosStack, workload: Workload, done: asyncio.Event) -> dict[str, Any]:
        cluster = stack.cluster
        assert cluster is not None
        figures: dict[str, Any] = {}
        await workload.wait_progress(800 / COMMANDS, timeout_s=300)
        if hold_back_s:
            await asyncio.to_thread(cluster.hold_back)
            await sleep_unless(done, hold_back_s)  # the primary goes on committing without it
        figures["standby_behind_bytes"] = await asyncio.to_thread(cluster.replay_lag_bytes)
        figures["head_before_failover"] = await head_position(stack.database_url)
        promotion = await asyncio.to_thread(cluster.fail_over)
        figures["head_after_promotion"] = await head_position(stack.database_url)
        figures["promote_s"] = promotion.promote_s
        figures["standby_start_s"] = promotion.standby_start_s
        figures["promoted_at_monotonic"] = promotion.promoted_at
        figures["promoted_at_wall"] = time.time() - (time.monotonic() - promotion.promoted_at)
        figures["after_failover"] = await recovery(stack, workload)
        await sleep_unless(done, AFTER_PROMOTION_S)
        workload.stop()
        return figures

    return fault


def _checked(record: Any) -> None:
    assert record.passed, record.failures
    assert record.figures.get("order_status") == "confirmed", record.figures
    assert record.figures.get("first_ack_after_promotion_s") is not None, record.figures


async def test_failover_with_synchronous_replication(chaos_report: ChaosReport, chaos_logs: Path) -> None:
    """Nothing acknowledged is lost, every process follows the new primary, the views match it."""
    scenario = Scenario(
        "8-failover-sync",
        "synchronous standby; kill -9 of the primary, standby promoted; stack on a multi-host URL",
        failover(0.0),
        commands=COMMANDS,
        idempotency=True,
        replication="sync",
        after_checks=order_settles,
    )
    record = await run_scenario(scenario, chaos_report, chaos_logs)
    _checked(record)
    assert record.figures.get("acked_lost", 0) == 0


async def test_failover_with_asynchronous_replication(chaos_report: ChaosReport, chaos_logs: Path) -> None:
    """The acknowledged commits the standby never got are reported; no replica serves them afterwards."""
    scenario = Scenario(
        "9-failover-async",
        f"asynchronous standby held back {HOLD_BACK_S:g} s, then kill -9 of the primary and promotion",
        failover(HOLD_BACK_S),
        commands=COMMANDS,
        idempotency=True,
        replication="async",
        may_lose_acks=True,
        after_checks=order_settles,
        notes=["acknowledged commands the standby never received are reported as acked_lost, not failed"],
    )
    record = await run_scenario(scenario, chaos_report, chaos_logs)
    _checked(record)
    assert record.figures["acked_lost"] > 0, "the held-back standby lost nothing: the scenario tested no rewind"
