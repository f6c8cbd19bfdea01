"""Commit → visible at fixed write rates, with the CPU each process of the stack used meanwhile.

    python -m devstack.measure_lag_cpu --rates 40,80,136 [--duration 8] [--json FILE]

Starts a write service, one relay and two read replicas (over DATABASE_URL / REDIS_URL when
set, embedded servers otherwise; a scratch database and key prefix, removed afterwards), then
for each rate runs `python -m devstack.loadtest lag` (AddProduct on an open-model schedule,
each reply followed by a GetProduct with its consistency token on every replica) and prints:
command reply p50/p99, reply → visible p50/p99 per replica, and the share of one core that
each service process (with its workers), the machine's Postgres and Redis processes, and the whole machine used
during the run. A rate that saturates the machine shows as the machine's share nearing its
core count, and the lag then measures queueing. Linux only (it reads /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from devstack.bench.env import Backing, backing, bench_stack, scratch
from devstack.bench.lag_bench import lag_load
from devstack.cpu import machine_busy_s, named_cpu_s, shares, tree_cpu_seconds

BACKING_PROCESSES = ("postgres", "redis-server")


def readings(pids: Mapping[str, int]) -> dict[str, float]:
    """One CPU reading of each service, of Postgres + Redis, and of the machine."""
    values = {name: tree_cpu_seconds(pid) for name, pid in pids.items()}
    values["postgres+redis"] = named_cpu_s(BACKING_PROCESSES)
    values["machine"] = machine_busy_s()
    return values


async def measure(
    backing: Backing, rates: Sequence[float], duration_s: float, say: Callable[[str], None]
) -> list[dict[str, Any]]:
    """The figures at each rate, measured one after another on one stack."""
    results: list[dict[str, Any]] = []
    async with scratch(backing, "lagcpu") as place:
        with bench_stack(place, relays=1, readers=2) as stack:
            pids = {process.name: process.pid for process in stack.processes if process.pid is not None}
            for rate in rates:
                before, started = readings(pids), time.monotonic()
                report = await asyncio.to_thread(lag_load, stack.write_address, stack.read_addresses, rate, duration_s)
                cpu = shares(before, readings(pids), time.monotonic() - started)
                commands = report.get("command_latency_ms") or {}
                per_replica = report.get("per_replica") or {}
                result = {
                    "rate": rate,
                    "commands": report.get("commands"),
                    "errors": report.get("errors") or {},
                    "reply_ms": {"p50": commands.get("p50"), "p99": commands.get("p99")},
                    "visible_ms": {
                        address: {"p50": figures["latency_ms"]["p50"], "p99": figures["latency_ms"]["p99"]}
                        for address, figures in per_replica.items()
                        if isinstance(figures, dict) and figures.get("latency_ms")
                    },
                    "cpu_cores": cpu,
                }
                results.append(result)
                say(describe(result))
    return results


def describe(result: Mapping[str, Any]) -> str:
    """One result as a line of text."""
    visible = ", ".join(f"{address} p50 {v['p50']} / p99 {v['p99']} ms" for address, v in result["visible_ms"].items())
    cpu = ", ".join(f"{name} {share:.2f}" for name, share in result["cpu_cores"].items())
    return (
        f"{result['rate']:g} AddProduct/s: reply p50 {result['reply_ms']['p50']} / p99 {result['reply_ms']['p99']} ms;"
        f" visible {visible}; cores used: {cpu}"
    )


def parse_rates(text: str) -> list[float]:
    """'40,80,136' → [40.0, 80.0, 136.0]; every rate must be positive."""
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"rates must be numbers separated by commas, not {text!r}") from None
    if not rates or any(rate <= 0 for rate in rates):
        raise argparse.ArgumentTypeError("give at least one rate, each above 0")
    return rates


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m devstack.measure_lag_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=parse_rates, default=[40.0, 80.0], help="AddProduct/s, comma-separated")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per rate")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.duration <= 0:
        parser.error("--duration must be above 0")

    def say(line: str) -> None:
        print(line, flush=True)

    with backing() as servers:
        results = asyncio.run(measure(servers, args.rates, args.duration, say))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
