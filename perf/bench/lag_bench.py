"""Figure 6: commit → visible on each replica, p50 and p99, at half the maximum write rate.

The maximum write rate is probed on this very stack, with the relay and both replicas consuming
what it writes (the write bench's figure is measured with nothing consuming, which is a higher
rate than the whole system sustains on a shared machine). `python -m perf lag` then
sends AddProduct on an open-model schedule at half that rate, and after each reply asks every
replica for the product with the reply's consistency token; the replica answers once its view
reflects it. The lag is reply → fresh answer, so it includes one query round trip. The stack: a
write service, one relay, two replicas.
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
from perf.stack import Backing, bench_stack, scratch


@dataclass(frozen=True, slots=True)
class LagSizes:
    """How long the open-model load runs, and the rate to use when the write bench did not run."""

    duration_s: float = 10.0
    replicas: int = 2
    probe_duration_s: float = 4.0  # max-rate probe on the lag stack


def lag_rows(replicas: int) -> list[Row]:
    """Two rows (p50, p99) per replica."""
    rows: list[Row] = []
    for index in range(1, replicas + 1):
        for label, threshold in (("p50", 5.0), ("p99", 20.0)):
            rows.append(
                Row(
                    key="lag",
                    figure=f"commit → visible on replica {index}, {label}",
                    unit="ms",
                    goal=Goal("value", "<=", threshold, "ms"),
                    how=f"{LAG}, AddProduct at half the max write rate, GetProduct with the token",
                )
            )
    return rows


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
) -> None:
    """Per-replica p50/p99 from a loadtest lag report (rows in lag_rows order).

    `busy_cores`: how much of the machine was busy during the run, noted because a machine near
    its core count makes the figure measure a queue rather than the path.
    """
    per_replica = report.get("per_replica")
    if not isinstance(per_replica, dict):
        raise ToolError("the lag report has no object 'per_replica'")
    for index, address in enumerate(reads):
        p50, p99 = rows[2 * index], rows[2 * index + 1]
        figures = per_replica.get(address)
        latency = figures.get("latency_ms") if isinstance(figures, dict) else None
        if not isinstance(figures, dict) or not isinstance(latency, dict) or not figures.get("visible"):
            for row in (p50, p99):
                row.fail(f"no command became visible on {address}")
            continue
        p50.value = number(latency, "p50")
        p99.value = number(latency, "p99")
        p99.notes.append(f"max {latency.get('max')} ms over {figures.get('visible')} commands")
    errors = report.get("errors") or {}
    command_latency = report.get("command_latency_ms") or {}
    rows[0].notes.append(
        f"{rate:.0f} AddProduct/s for {report.get('duration_s')} s{probed}: {report.get('commands')} commands, "
        f"errors {errors or 'none'}; command reply p50 {command_latency.get('p50')} ms, "
        f"p99 {command_latency.get('p99')} ms"
    )
    if busy_cores is not None:
        rows[0].notes.append(
            f"the machine was busy {busy_cores:.2f} of its {os.cpu_count() or '?'} cores during the lag run"
            " (services, Postgres, Redis and the measuring client together)"
        )


async def measure_lag(backing: Backing, sizes: LagSizes) -> list[Row]:
    """Fill the lag rows at half of the maximum write rate probed on the lag stack itself."""
    rows = lag_rows(sizes.replicas)
    async with scratch(backing, "lag") as place:
        with bench_stack(place, relays=1, readers=sizes.replicas) as stack:
            probe = await asyncio.to_thread(
                service_load, stack.write_address, processes=2, concurrency=32, duration_s=sizes.probe_duration_s
            )
            max_write_rps = ok_rps(probe)
            probed = f" (the maximum, {max_write_rps:.0f}/s, probed on this stack with the relay and replicas running)"
            if not max_write_rps:
                raise ToolError("no maximum write rate to take half of")
            rate = max_write_rps / 2
            reads = stack.read_addresses
            busy_before, started = machine_busy_s(), time.monotonic()
            report = await asyncio.to_thread(lag_load, stack.write_address, reads, rate, sizes.duration_s)
            busy = (machine_busy_s() - busy_before) / (time.monotonic() - started)
    fill_lag_rows(rows, report, reads, rate, probed, busy_cores=busy)
    return rows
