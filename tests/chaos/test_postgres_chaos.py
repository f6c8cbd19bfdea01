"""Postgres faults under load: backends terminated, a clean restart and a crash, with no client retries.

Each command is sent once, so every answer is seen as it is: it must be a success or a
retryable code (UNAVAILABLE, ABORTED, DEADLINE_EXCEEDED), and whatever was answered,
Postgres must hold either all of a command's effect or none of it. No service is
restarted by the test: each must reconnect by itself.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from devstack.chaos import ChaosStack
from tests.chaos.faults import recovery, sleep_unless
from tests.chaos.report import ChaosReport
from tests.chaos.scenario import Scenario, run_scenario
from tests.chaos.workload import Workload

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]

GAP_S = 3.0
CRASH_DOWN_S = 2.0
# The schedule, not the count, bounds these runs: the workload stops after the last fault.
COMMAND_CAP = 50_000


async def terminate_backends(database_url: str) -> int:
    """pg_terminate_backend on every client session but our own; return how many."""
    conn = await asyncpg.connect(database_url, timeout=5)
    try:
        killed = await conn.fetchval(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
            timeout=10,
        )
    finally:
        await conn.close()
    return int(killed)


async def postgres_faults(stack: ChaosStack, workload: Workload, done: asyncio.Event) -> dict[str, Any]:
    """Terminate every service backend, then restart Postgres cleanly, then crash it (kill -9, 2 s down)."""
    server = stack.postgres
    assert server is not None
    figures: dict[str, Any] = {}
    await workload.wait_progress(1_000 / COMMAND_CAP, timeout_s=300)

    figures["terminated_backends"] = await terminate_backends(stack.database_url)
    figures["after_terminate"] = await recovery(stack, workload)
    await sleep_unless(done, GAP_S)

    started = time.monotonic()
    await asyncio.to_thread(server.restart)
    figures["restart_down_s"] = round(time.monotonic() - started, 2)
    figures["after_restart"] = await recovery(stack, workload)
    await sleep_unless(done, GAP_S)

    await asyncio.to_thread(server.kill)
    await asyncio.sleep(CRASH_DOWN_S)
    await asyncio.to_thread(server.start)
    figures["after_crash"] = await recovery(stack, workload)
    await sleep_unless(done, GAP_S)
    workload.stop()
    figures["faults"] = 3
    return figures


async def test_postgres_backends_terminated_and_restarted(chaos_report: ChaosReport, chaos_logs: Path) -> None:
    """Every command succeeds or answers a retryable code, nothing is half-applied, everything reconnects."""
    scenario = Scenario(
        "6-postgres",
        "pg_terminate_backend on every service session, then a clean restart, then kill -9 + 2 s down",
        postgres_faults,
        commands=COMMAND_CAP,
        notes=["commands are sent once (no retries); the workload stops 3 s after the last fault"],
    )
    record = await run_scenario(scenario, chaos_report, chaos_logs)
    assert record.passed, record.failures
