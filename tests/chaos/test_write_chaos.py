"""Write-service faults under load: kill -9 at random moments while clients retry with idempotency keys."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from devstack.chaos import ChaosStack
from tests.chaos.faults import sleep_unless
from tests.chaos.report import ChaosReport
from tests.chaos.scenario import Scenario, run_scenario
from tests.chaos.workload import Workload

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]


async def kill_write_service(stack: ChaosStack, workload: Workload, done: asyncio.Event) -> dict[str, Any]:
    """Every 0.5-1.5 s SIGKILL the write service mid-load and start it again on the same port."""
    if not await workload.honours_idempotency_keys():
        # Without the feature a retry after a lost reply applies the command twice: the
        # scenario would only measure the missing feature.
        workload.stop()
        return {"faults": 0, "skip": "the write service does not honour idempotency-key yet"}
    rng = random.Random()
    write = stack.services.write
    assert write is not None
    downtimes: list[float] = []
    while not await sleep_unless(done, rng.uniform(0.5, 1.5)):
        killed_at = time.monotonic()
        await asyncio.to_thread(write.kill)
        await asyncio.to_thread(write.start)
        await write.wait_healthy_async(60.0)
        downtimes.append(time.monotonic() - killed_at)
    return {
        "faults": len(downtimes),
        "write_kills": len(downtimes),
        "idempotency_supported": True,
        "max_write_downtime_s": round(max(downtimes), 2) if downtimes else None,
        "median_write_downtime_s": round(statistics.median(downtimes), 2) if downtimes else None,
    }


async def test_kill_write_service_with_idempotent_retries(chaos_report: ChaosReport, chaos_logs: Path) -> None:
    """kill -9 of the write service: no state without events, no events without state, no duplicate effect."""
    scenario = Scenario(
        "3-write-kill",
        "kill -9 the write service every 0.5-1.5 s; clients retry with the same idempotency key",
        kill_write_service,
        commands=5_000,
        idempotency=True,
    )
    record = await run_scenario(scenario, chaos_report, chaos_logs)
    if record.skipped:
        pytest.skip(record.skipped)
    assert record.figures.get("write_kills", 0) >= 3, "too few kills to mean anything"
    assert record.passed, record.failures
