"""Figure 4: AddProduct commands/s through the write service ÷ the same transaction on a bare asyncpg pool.

The service is driven by `python -m devstack.loadtest write` (closed model, several client
processes, every command with its own idempotency key) against a write service with no relay
or replica running, so it has the machine to itself. The ceiling runs the same transaction as
plain SQL (`bare_asyncpg`) from as many client processes with as many transactions in flight,
on a pool of the service's size, against the same database. The two alternate (service,
bare, service, bare) and the best of each counts, which evens out a noisy neighbour.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from devstack.bench.env import Backing, bench_stack, scratch
from devstack.bench.loadgen import LoadResult, percentile, run_load
from devstack.bench.table import Goal, Row
from devstack.bench.tools import LOADTEST, ToolError, number, run_json_tool

POOL_SIZE = 10  # the write service's default DATABASE_POOL_MAX_SIZE


@dataclass(frozen=True, slots=True)
class WriteSizes:
    """How hard and how long the write load runs."""

    processes: int = 2
    concurrency: int = 32
    duration_s: float = 10.0
    rounds: int = 2


def write_rows() -> list[Row]:
    """The rows this bench fills."""
    return [
        Row(
            key="write",
            figure="write AddProduct commands/s (no password hashing)",
            unit="/s",
            goal=Goal("ratio", ">=", 0.50),
            how=f"{LOADTEST} write, closed model, AddProduct with idempotency keys",
            ceiling_label="bare asyncpg pool, same SQL",
        )
    ]


def service_load(address: str, *, processes: int, concurrency: int, duration_s: float) -> dict[str, Any]:
    """`python -m devstack.loadtest write` of AddProduct against `address`; its JSON report."""
    args = [
        "write",
        "--write",
        address,
        "--command",
        "add_product",
        "--concurrency",
        str(concurrency),
        "--duration",
        f"{duration_s:g}",
        "--processes",
        str(processes),
    ]
    return run_json_tool(LOADTEST, args, timeout_s=duration_s + 120)


def ok_rps(report: dict[str, Any]) -> float:
    """Successful commands per second of a loadtest report."""
    return number(report, "ok_rps") if "ok_rps" in report else number(report, "rps")


def describe_service(report: dict[str, Any]) -> str:
    """One line about a loadtest write report."""
    latency = report.get("latency_ms") or {}
    errors = report.get("errors") or {}
    return (
        f"service: {report.get('ok')} ok, errors {errors or 'none'} in {report.get('elapsed_s')} s, "
        f"p50 {latency.get('p50')} ms, p99 {latency.get('p99')} ms"
    )


def describe_bare(result: LoadResult) -> str:
    """One line about a bare run."""
    return (
        f"bare: {result.ok} ok / {result.errors} errors in {result.duration_s:g} s, "
        f"p50 {percentile(result.latencies_ms, 0.5):.1f} ms, p99 {percentile(result.latencies_ms, 0.99):.1f} ms"
    )


async def measure_write(backing: Backing, sizes: WriteSizes) -> tuple[list[Row], float | None]:
    """Fill the write row; also return the service's commands/s (the lag bench runs at half of it)."""
    (row,) = rows = write_rows()
    row.how = (
        f"{LOADTEST} write: {sizes.processes} client processes, {sizes.concurrency} in flight, "
        f"{sizes.duration_s:g} s, best of {sizes.rounds}; ceiling: asyncpg pool of {POOL_SIZE}, "
        "same processes and concurrency"
    )
    services: list[dict[str, Any]] = []
    bares: list[LoadResult] = []
    async with scratch(backing, "write") as place:
        with bench_stack(place, relays=0, readers=0) as stack:
            for _ in range(sizes.rounds):
                services.append(
                    await asyncio.to_thread(
                        service_load,
                        stack.write_address,
                        processes=sizes.processes,
                        concurrency=sizes.concurrency,
                        duration_s=sizes.duration_s,
                    )
                )
                bares.append(
                    await asyncio.to_thread(
                        run_load,
                        place.database_url,
                        processes=sizes.processes,
                        concurrency=sizes.concurrency,
                        duration_s=sizes.duration_s,
                        pool_size=POOL_SIZE,
                    )
                )
    service = max(services, key=ok_rps)
    bare = max(bares, key=lambda result: result.rps)
    if ok_rps(service) <= 0:
        raise ToolError(f"no command succeeded through the service: {describe_service(service)}")
    if bare.ok == 0:
        raise RuntimeError(f"no bare transaction succeeded ({bare.first_error or 'no error reported'})")
    row.value = ok_rps(service)
    row.ceiling = bare.rps
    row.notes.append(describe_service(service))
    row.notes.append(describe_bare(bare))
    row.notes.append(
        "all rounds, service / bare: "
        + ", ".join(f"{ok_rps(a):.0f} / {b.rps:.0f}" for a, b in zip(services, bares, strict=True))
    )
    if bare.errors:
        row.notes.append(f"bare errors, first: {bare.first_error}")
    return rows, row.value
