"""`python -m write_service.saga` as a real process: health, driving a saga, and a clean SIGTERM."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from devstack.supervisor import ServiceProcess
from shared_kernel.platform.healthcheck import check_serving_async
from tests.integration.write_service.saga.support import (
    add_product,
    add_user,
    configure_provider,
    order_row,
    payment,
    place_order,
    saga_row,
    wait_sagas_settled,
    wait_until,
)

pytestmark = pytest.mark.integration


async def test_worker_process_serves_health_drives_sagas_and_stops_cleanly(
    db_pool: asyncpg.Pool[Any],
    database_url: str,
    provider: grpc.aio.Channel,
    provider_process: ServiceProcess,
    tmp_path: Path,
) -> None:
    customer = await add_user(db_pool)
    product, _ = await add_product(db_pool, 3)
    first = await place_order(db_pool, customer, [(product, 1)])
    worker = ServiceProcess.python_module(
        "saga-worker",
        "write_service.saga",
        grpc_port=0,
        env={
            "DATABASE_URL": database_url,
            "PAYMENT_PROVIDER_ADDRESS": provider_process.address,
            "SAGA_WORKER_ID": "process-under-test",
            "GRPC_SHUTDOWN_GRACE_S": "2",
            "LOG_LEVEL": "INFO",
        },
        log_path=tmp_path / "saga.log",
    )
    with worker:
        assert await check_serving_async(worker.address)
        await wait_sagas_settled(db_pool, timeout=20)
        assert (await order_row(db_pool, first))["status"] == "confirmed"
        second = await place_order(db_pool, customer, [(product, 1)])  # woken by NOTIFY saga_due

        async def confirmed() -> bool:
            return bool((await order_row(db_pool, second))["status"] == "confirmed")

        await wait_until(confirmed, 10, "the second order")
        worker.begin_terminate()  # SIGTERM
        code = await asyncio.to_thread(worker.finish_terminate, 15.0)
    assert code == 0, worker.log_tail()
    log = (tmp_path / "saga.log").read_text()
    assert "saga worker stopped" in log
    assert (await saga_row(db_pool, second))["locked_by"] is None


async def test_sigterm_mid_step_hands_the_saga_back_for_the_next_worker(
    db_pool: asyncpg.Pool[Any],
    database_url: str,
    provider: grpc.aio.Channel,
    provider_process: ServiceProcess,
    tmp_path: Path,
) -> None:
    customer = await add_user(db_pool)
    product, _ = await add_product(db_pool, 3)
    await configure_provider(provider, latency_ms=3000)  # every provider call outlasts the shutdown grace
    order_id = await place_order(db_pool, customer, [(product, 1)])
    env = {
        "DATABASE_URL": database_url,
        "PAYMENT_PROVIDER_ADDRESS": provider_process.address,
        "PAYMENT_PROVIDER_TIMEOUT_S": "5",
        "SAGA_LEASE_S": "60",  # only the hand-back, not the lease running out, can free it in time
        "GRPC_SHUTDOWN_GRACE_S": "0.5",
    }
    first = ServiceProcess.python_module(
        "saga-first", "write_service.saga", grpc_port=0, env=env, log_path=tmp_path / "first.log"
    )
    with first:

        async def authorizing() -> bool:
            row = await saga_row(db_pool, order_id)
            return bool(row["current_step"] == "authorize_payment" and row["locked_by"] is not None)

        await wait_until(authorizing, 10, "the authorize call to start")
        first.begin_terminate()
        assert await asyncio.to_thread(first.finish_terminate, 15.0) == 0, first.log_tail()
    row = await saga_row(db_pool, order_id)
    assert (row["status"], row["current_step"], row["locked_by"]) == ("running", "authorize_payment", None)
    await configure_provider(provider)
    second = ServiceProcess.python_module(
        "saga-second", "write_service.saga", grpc_port=0, env=env, log_path=tmp_path / "second.log"
    )
    with second:
        await wait_sagas_settled(db_pool, timeout=20)
    assert (await order_row(db_pool, order_id))["status"] == "confirmed"
    paid = await payment(provider, order_id)
    assert paid is not None
    assert paid.captures == 1
