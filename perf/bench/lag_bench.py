"""Figure 6: commit → visible on each replica, p50 and p99, at two fixed write rates.

Two schedules, each as rows per replica (issue 12's goals):

- **at 100 commands/s**: p50 ≤ 5 ms and p99 ≤ 20 ms. A rate low enough for any machine the
  bench runs on, so the rows measure the path (relay, apply, query wake-up), not a queue.
- **at half the maximum write rate**: p99 ≤ 20 ms, one row per replica (the issue sets no
  p50 goal there; the p50 is in the row's notes, since a row without a goal is a ceiling). The
  maximum is probed on this very stack, with the relay and both replicas consuming what it
  writes (the write bench's figure is measured with nothing consuming, which is a higher rate
  than the whole system sustains on a shared machine).

`python -m perf lag` sends AddProduct on an open-model schedule at the rate, and after each
reply asks every replica for the product with the reply's consistency token; the replica
answers once its view reflects it. The lag is reply → fresh answer, so it includes one query
round trip. The stack: a write service, one relay, two replicas.

Each run starts on a settled stack: before it, one fresh command must be visible on every
replica (within a deadline). The probe leaves a backlog in the relay and the replicas; a run
started on it measured that queue (p50 of seconds) instead of the lag. The notes say how long
settling took and how busy the machine was during each run.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any

from perf.bench.table import Goal, Row
from perf.bench.tools import LAG, ToolError, number, run_json_tool
from perf.bench.write_bench import ok_rps, service_load
from perf.cpu import machine_busy_s
from perf.lag import wait_until_settled
from perf.loadtest.probe import NotVisible
from perf.stack import Backing, bench_stack, scratch

FIXED_RATE = 100.0  # commands/s of the fixed-rate rows (issue 12)
SETTLE_WITHIN_S = 60.0  # how long the stack may take to show a fresh command before a run


@dataclass(frozen=True, slots=True)
class LagSizes:
    """How long each open-model load runs, on how many replicas, and how long the max-rate probe runs."""

    duration_s: float = 10.0
    replicas: int = 2
    probe_duration_s: float = 4.0  # max-rate probe on the lag stack


@dataclass(frozen=True, slots=True)
class Schedule:
    """One lag run's rows: its rate in words and the goal of each percentile (p50 None: no p50 row)."""

    label: str
    p50_goal: float | None
    p99_goal: float


FIXED = Schedule(f"at {FIXED_RATE:g} AddProduct/s", 5.0, 20.0)
HALF_MAX = Schedule("at half the max write rate", None, 20.0)


def schedule_rows(schedule: Schedule, replicas: int) -> list[Row]:
    """Per replica, a p50 row (when the schedule has a p50 goal) and a p99 row."""
    rows: list[Row] = []
    percentiles = [("p50", schedule.p50_goal)] if schedule.p50_goal is not None else []
    percentiles.append(("p99", schedule.p99_goal))
    for index in range(1, replicas + 1):
        for label, threshold in percentiles:
            rows.append(
                Row(
                    key="lag",
                    figure=f"commit → visible on replica {index}, {label}, {schedule.label}",
                    unit="ms",
                    goal=Goal("value", "<=", threshold, "ms"),
                    how=f"{LAG}, AddProduct {schedule.label}, GetProduct with the token",
                )
            )
    return rows


def lag_rows(replicas: int) -> list[Row]:
    """The fixed-rate rows (p50 and p99 per replica), then the half-max rows (p99 per replica)."""
    return schedule_rows(FIXED, replicas) + schedule_rows(HALF_MAX, replicas)


def lag_load(write: str, reads: list[str], rate: float, duration_s: float) -> dict[str, Any]:
    """`python -m perf lag` of AddProduct at `rate`; its JSON report."""
    args = [
        "--write",
        write,
        "--read",
        ",".join(reads),
        "--command",
        "add_product",
        "--rate",
        f"{rate:.1f}",
        "--duration",
        f"{duration_s:g}",
    ]
    return run_json_tool(LAG, args, timeout_s=duration_s + 180)


def fill_lag_rows(
    rows: list[Row],
    report: dict[str, Any],
    reads: list[str],
    rate: float,
    probed: str,
    *,
    busy_cores: float | None = None,
    settled_s: float | None = None,
) -> None:
    """Per-replica figures of one schedule from a lag report (rows in schedule_rows order).

    Rows come per replica as (p50, p99) or, for a schedule without a p50 goal, (p99,) with the
    p50 in its notes.

    `busy_cores`: how much of the machine was busy during the run, noted because a machine near
    its core count makes the figure measure a queue rather than the path.
    """
    per_replica = report.get("per_replica")
    if not isinstance(per_replica, dict):
        raise ToolError("the lag report has no object 'per_replica'")
    per = len(rows) // len(reads)
    for index, address in enumerate(reads):
        mine = rows[per * index : per * (index + 1)]
        p50, p99 = (mine[0], mine[1]) if per == 2 else (None, mine[0])
        figures = per_replica.get(address)
        latency = figures.get("latency_ms") if isinstance(figures, dict) else None
        if not isinstance(figures, dict) or not isinstance(latency, dict) or not figures.get("visible"):
            for row in mine:
                row.fail(f"no command became visible on {address}")
            continue
        if p50 is not None:
            p50.value = number(latency, "p50")
        else:
            p99.notes.append(f"p50 {number(latency, 'p50')} ms (no goal)")
        p99.value = number(latency, "p99")
        p99.notes.append(f"max {latency.get('max')} ms over {figures.get('visible')} commands")
    errors = report.get("errors") or {}
    command_latency = report.get("command_latency_ms") or {}
    rows[0].notes.append(
        f"{rate:.0f} AddProduct/s for {report.get('duration_s')} s{probed}: {report.get('commands')} commands, "
        f"errors {errors or 'none'}; command reply p50 {command_latency.get('p50')} ms, "
        f"p99 {command_latency.get('p99')} ms"
    )
    if settled_s is not None:
        rows[0].notes.append(
            f"the run started once a fresh command was visible on every replica ({settled_s * 1000:.0f} ms)"
        )
    if busy_cores is not None:
        rows[0].notes.append(
            f"the machine was busy {busy_cores:.2f} of its {os.cpu_count() or '?'} cores during the lag run"
            " (services, Postgres, Redis and the measuring client together)"
        )


async def _settle(write: str, reads: list[str]) -> float:
    """Seconds until a fresh command was visible on every replica; ToolError past SETTLE_WITHIN_S."""
    try:
        return await wait_until_settled(write, reads, within_s=SETTLE_WITHIN_S)
    except NotVisible as exc:
        raise ToolError(f"the stack did not settle before the lag run: {exc}") from None


async def _timed_run(write: str, reads: list[str], rate: float, duration_s: float) -> tuple[dict[str, Any], float]:
    """One lag run on a settled stack: its report and the cores the machine was busy meanwhile."""
    busy_before, started = machine_busy_s(), time.monotonic()
    report = await asyncio.to_thread(lag_load, write, reads, rate, duration_s)
    return report, (machine_busy_s() - busy_before) / (time.monotonic() - started)


async def measure_lag(backing: Backing, sizes: LagSizes) -> list[Row]:
    """Fill the fixed-rate rows, then the rows at half of the maximum write rate probed on the lag stack."""
    fixed_rows = schedule_rows(FIXED, sizes.replicas)
    half_rows = schedule_rows(HALF_MAX, sizes.replicas)
    async with scratch(backing, "lag") as place:
        with bench_stack(place, relays=1, readers=sizes.replicas) as stack:
            write, reads = stack.write_address, list(stack.read_addresses)
            try:
                settled = await _settle(write, reads)
                report, busy = await _timed_run(write, reads, FIXED_RATE, sizes.duration_s)
                fill_lag_rows(fixed_rows, report, reads, FIXED_RATE, "", busy_cores=busy, settled_s=settled)
            except ToolError as exc:
                # The half-max run still has its own chance on the same stack.
                for row in fixed_rows:
                    row.fail(str(exc))
            probe = await asyncio.to_thread(
                service_load, write, processes=2, concurrency=32, duration_s=sizes.probe_duration_s
            )
            max_write_rps = ok_rps(probe)
            if not max_write_rps:
                for row in half_rows:
                    row.fail("no maximum write rate to take half of")
                return fixed_rows + half_rows
            probed = f" (the maximum, {max_write_rps:.0f}/s, probed on this stack with the relay and replicas running)"
            rate = max_write_rps / 2
            try:
                settled = await _settle(write, reads)
            except ToolError as exc:
                for row in half_rows:
                    row.fail(str(exc))
                return fixed_rows + half_rows
            report, busy = await _timed_run(write, reads, rate, sizes.duration_s)
            fill_lag_rows(half_rows, report, reads, rate, probed, busy_cores=busy, settled_s=settled)
    return fixed_rows + half_rows
