"""Network faults between the services and Postgres/Redis, through devstack.tcp_proxy, under load.

Every service reaches Postgres and Redis only through a proxy; the checks and the
recording subscriber connect directly. The schedule: latency, connection resets on each
side, a black hole on each side longer than the clients' timeouts, and refused
connections to Redis. Commands are sent once, as in the Postgres scenario.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from devstack.chaos import ChaosStack
from devstack.tcp_proxy import TcpProxy
from tests.chaos.faults import recovery, sleep_unless
from tests.chaos.report import ChaosReport
from tests.chaos.scenario import Scenario, run_scenario
from tests.chaos.workload import Workload

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(600)]

GAP_S = 2.0
LATENCY_S = 0.05
LATENCY_FOR_S = 3.0
# Longer than the services' 5 s socket and connect timeouts, so that those fire.
BLACK_HOLE_S = 6.0
REFUSE_S = 3.0
COMMAND_CAP = 50_000


async def network_faults(stack: ChaosStack, workload: Workload, done: asyncio.Event) -> dict[str, Any]:
    """Run the schedule in the module docstring, timing the recovery after each fault."""
    pg, rd = stack.pg_proxy, stack.redis_proxy
    assert pg is not None and rd is not None
    figures: dict[str, Any] = {}
    await workload.wait_progress(1_000 / COMMAND_CAP, timeout_s=300)

    for proxy in (pg, rd):
        proxy.set_latency(LATENCY_S)
    await asyncio.sleep(LATENCY_FOR_S)
    for proxy in (pg, rd):
        proxy.set_latency(0.0)
    figures["after_latency"] = await recovery(stack, workload)
    await sleep_unless(done, GAP_S)

    for name, proxy in (("postgres", pg), ("redis", rd)):
        figures[f"reset_{name}_connections"] = await asyncio.to_thread(proxy.reset_all)
        figures[f"after_reset_{name}"] = await recovery(stack, workload)
        await sleep_unless(done, GAP_S)

    for name, proxy in (("redis", rd), ("postgres", pg)):
        await asyncio.to_thread(proxy.black_hole)
        await asyncio.sleep(BLACK_HOLE_S)
        await asyncio.to_thread(proxy.heal)
        figures[f"after_black_hole_{name}"] = await recovery(stack, workload)
        await sleep_unless(done, GAP_S)

    rd.refuse(True)
    await asyncio.to_thread(rd.reset_all)
    await asyncio.sleep(REFUSE_S)
    rd.refuse(False)
    figures["after_refused_redis"] = await recovery(stack, workload)
    await sleep_unless(done, GAP_S)
    workload.stop()
    figures["faults"] = 7
    figures["proxy_stats"] = {name: _stats(proxy) for name, proxy in (("postgres", pg), ("redis", rd))}
    return figures


def _stats(proxy: TcpProxy) -> dict[str, int]:
    stats = proxy.stats()
    return {"accepted": stats.accepted, "resets": stats.resets, "refused": stats.refused}


async def test_network_faults_through_the_proxy(chaos_report: ChaosReport, chaos_logs: Path) -> None:
    """Latency, resets, black holes and refusals: the same invariants as every other scenario."""
    scenario = Scenario(
        "7-network",
        f"proxy faults: {LATENCY_S * 1000:g} ms latency, resets (Postgres, Redis), "
        f"{BLACK_HOLE_S:g} s black holes (Redis, Postgres), Redis refusing for {REFUSE_S:g} s",
        network_faults,
        commands=COMMAND_CAP,
        proxied=True,
        notes=["commands are sent once (no retries); the workload stops 2 s after the last fault"],
    )
    record = await run_scenario(scenario, chaos_report, chaos_logs)
    assert record.passed, record.failures
