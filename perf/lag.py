"""Reply → visible on each read replica: the project's one lag measurement.

After each command's reply, every replica is asked for the new aggregate with the reply's
consistency token and `max_wait_ms`: the replica answers as soon as its view reflects the token
(it is woken by its projector, not polled), so reply → fresh answer is the lag plus one query
round trip. An answer marked stale, NOT_FOUND or UNAVAILABLE is asked again until a deadline.

    python -m perf lag -n 1000                                   # RegisterUser, one after another
    python -m perf lag --orders -n 1000                          # PlaceOrder, saga workers running
    python -m perf lag --command add_product --rate 50 --duration 10
    python -m perf lag --command add_product --rates 40,80,136   # and each process's CPU share
    python -m perf lag --write 127.0.0.1:50051 --read 127.0.0.1:50052,127.0.0.1:50053 -n 300

Schedules: `-n N` sends N commands one after another, each once the previous one is visible on
every replica (the lag of an idle system); `--rate R --duration S` sends them on an open-model
schedule (due at fixed intervals, whatever the replies do); `--rates` runs several such
schedules on one stack and reports, for each, the share of one core that each service
process, this measuring client, Postgres + Redis and the whole machine used meanwhile (Linux,
from /proc).

Without --write it starts a measured stack of its own (write service, one relay, two replicas,
and for PlaceOrder a payment provider and a saga worker) on a scratch database and key prefix
over DATABASE_URL / REDIS_URL when set, embedded servers otherwise, and removes it afterwards.
That stack hashes passwords with cheap argon2 parameters: the lag counts from the reply, so
hashing does not enter it.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from perf.cpu import machine_busy_s, named_cpu_s, process_cpu_s, shares, tree_cpu_seconds
from perf.loadtest.engine import Progress
from perf.loadtest.probe import NotVisible, call_until_fresh, replica_client
from perf.loadtest.requests import PASSWORD, CommandSource, add_product_request, bearer_token, send_command
from perf.loadtest.schedule import due_offsets
from perf.loadtest.stats import Histogram, Second, Timeline
from perf.report import build_report, print_summary, write_json
from perf.stack import FAST_HASHING, Backing, backing, bench_stack, scratch
from shared_kernel.platform import runtime
from tessera.orders.v1 import order_command_service_pb2 as order_commands
from tessera.orders.v1 import order_pb2
from tessera_client import TesseraClient, TesseraError

# Each command measured, with the query that shows its effect.
LAG_COMMANDS = {"register_user": "get_user", "add_product": "get_product", "place_order": "get_order"}
BACKING_PROCESSES = ("postgres", "redis-server")


@dataclass
class LagResult:
    """Per-replica lags, command latencies and the merged timeline."""

    per_replica: dict[str, Histogram] = field(default_factory=dict)
    commands: Histogram = field(default_factory=Histogram)
    timeline: Timeline = field(default_factory=Timeline)
    errors: dict[str, int] = field(default_factory=dict)
    first_errors: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def error(self, code: str, details: str) -> None:
        """Count one failure."""
        self.errors[code] = self.errors.get(code, 0) + 1
        self.first_errors.setdefault(code, details[:300])


def _new_id(command: str, reply: Any) -> str:
    if command == "register_user":
        return str(reply.user_id)
    if command == "add_product":
        return str(reply.product_id)
    return str(reply.order_id)


async def _sender(writer: TesseraClient, command: str) -> Callable[[], Awaitable[Any]]:
    """A function sending the next command; PlaceOrder first gets a customer and a product in stock."""
    if command != "place_order":
        source = CommandSource(command, 0)
        return lambda: send_command(writer, source.next_command(), 30.0)
    run = secrets.token_hex(4)
    customer = await writer.users.register_user(
        email=f"lag-{run}@example.com", username=f"lag{run}", password=PASSWORD, full_name="Lag Probe", timeout=30.0
    )
    sku = f"LAG-{run}"
    await writer.catalog.add_product(add_product_request(sku, "Lag probe", stock=1_000_000_000), timeout=30.0)
    address = order_pb2.Address(
        recipient="Lag Probe", line1="1 Main St", city="Berlin", postal_code="10115", country_code="DE"
    )
    request = order_commands.PlaceOrderRequest(
        customer_id=customer.user_id, items=[order_commands.OrderItem(sku=sku, quantity=1)], shipping_address=address
    )
    return lambda: writer.orders.place_order(request, timeout=30.0)


async def measure_lag(  # noqa: PLR0915 - one schedule with its per-command closure
    write: str,
    reads: Sequence[str],
    *,
    command: str,
    rate: float | None,
    duration_s: float = 0.0,
    count: int = 0,
    metadata: Sequence[tuple[str, str]] = (),
    visible_within_s: float = 30.0,
    progress_out: TextIO | None = sys.stderr,
) -> LagResult:
    """Run the schedule and return the lags by replica (milliseconds).

    With `rate`, commands are due on an open-model schedule for `duration_s`; without, `count`
    commands are sent one after another, each once the previous one is visible everywhere.
    """
    if command not in LAG_COMMANDS:
        raise ValueError(f"lag measures {' or '.join(LAG_COMMANDS)}, not {command!r}")
    kind = LAG_COMMANDS[command]
    result = LagResult(per_replica={address: Histogram() for address in reads})
    progress = Progress(progress_out)
    # Commands on one client; each replica is queried through a client reading from it alone.
    writer = TesseraClient(write, None, token=bearer_token(metadata), timeout=30.0, session=False)
    replicas = {address: replica_client(address, metadata, write) for address in reads}
    last_second = max(0, math.ceil(duration_s) - 1) if rate is not None else sys.maxsize
    tasks: set[asyncio.Task[None]] = set()
    ticking: asyncio.Task[None] | None = None
    start = time.perf_counter()

    async def one(due: float) -> None:
        try:
            reply: Any = await send()
        except TesseraError as error:
            result.error(error.code.name, error.message)
            progress.add(Second(errors={error.code.name: 1}))
            return
        replied = time.perf_counter()
        result.commands.record((replied - due) * 1000.0)
        key, token = _new_id(command, reply), str(reply.consistency_token)
        seen = await asyncio.gather(
            *(call_until_fresh(client, kind, key, token, replied + visible_within_s) for client in replicas.values()),
            return_exceptions=True,
        )
        second = Second()
        for address, when in zip(replicas, seen, strict=True):
            if isinstance(when, float):
                lag_ms = (when - replied) * 1000.0
                result.per_replica[address].record(lag_ms)
                second.latencies.record(lag_ms)
            elif isinstance(when, NotVisible):
                second.errors["NOT_VISIBLE"] = second.errors.get("NOT_VISIBLE", 0) + 1
                result.error("NOT_VISIBLE", f"{address}: {when}")
            elif isinstance(when, TesseraError):
                second.errors[when.code.name] = second.errors.get(when.code.name, 0) + 1
                result.error(when.code.name, f"{address}: {when.message}")
            else:
                raise when
        # Commands answered after the schedule's end count in its last second.
        result.timeline.add(min(max(0, int(replied - start)), last_second), second)
        progress.add(second)

    async def ticker() -> None:
        while True:
            await asyncio.sleep(1.0)
            progress.show()

    try:
        send = await _sender(writer, command)
        ticking = asyncio.create_task(ticker())
        start = time.perf_counter() + 0.2
        if rate is None:
            for _ in range(count):
                await one(time.perf_counter())
            result.elapsed_s = time.perf_counter() - start
            return result
        for _number, offset in due_offsets(rate, duration_s, 0, 1):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(start + offset))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=visible_within_s + 35.0)
        result.elapsed_s = max(duration_s, time.perf_counter() - start)
    finally:
        if ticking is not None:
            ticking.cancel()
        for task in tasks:
            task.cancel()
        await writer.close()
        for client in replicas.values():
            await client.close()
    return result


async def wait_until_settled(
    write: str, reads: Sequence[str], *, command: str = "add_product", within_s: float = 60.0
) -> float:
    """Send one fresh command and wait until every replica shows it; the seconds that took.

    Replicas apply in position order, so a fresh command visible everywhere means whatever was
    queued before it (a load's backlog in the relay or the replicas) has been applied: a lag
    run that starts afterwards measures the path, not the previous load's queue. Raises
    NotVisible when that does not happen within `within_s`.
    """
    started = time.perf_counter()
    result = await measure_lag(
        write, reads, command=command, rate=None, count=1, visible_within_s=within_s, progress_out=None
    )
    missing = [address for address, histogram in result.per_replica.items() if histogram.count == 0]
    if missing or result.errors:
        details = "; ".join(f"{code}: {text}" for code, text in sorted(result.first_errors.items()))
        raise NotVisible(
            f"a fresh {command} was not visible on {', '.join(missing) or 'every replica'} "
            f"within {within_s:g} s ({details or 'no error'})"
        )
    return time.perf_counter() - started


def lag_report(
    result: LagResult, *, write: str, reads: Sequence[str], command: str, rate: float | None, duration_s: float
) -> dict[str, object]:
    """The JSON document of a lag run (the load tester's keys, plus per replica and per command)."""
    merged = Histogram()
    for histogram in result.per_replica.values():
        merged.merge(histogram)
    return build_report(
        mode="lag",
        engine="python",
        targets=reads,
        processes=1,
        rate=rate,
        concurrency=None if rate is not None else 1,
        duration_s=duration_s if rate is not None else round(result.elapsed_s, 3),
        timeline=result.timeline,
        elapsed_s=result.elapsed_s,
        latencies=merged,
        errors=result.errors,
        verified_by="each replica answered a query carrying the reply's consistency token, not marked stale",
        extra={
            "command": command,
            "commands": result.commands.count,
            "write": write,
            "per_replica": {
                address: {"latency_ms": histogram.summary(), "visible": histogram.count}
                for address, histogram in result.per_replica.items()
            },
            "command_latency_ms": result.commands.summary(),
            "note": "lag = command reply → first fresh answer from the replica (includes that query's round trip); "
            "requests and ok count (command, replica) pairs",
        },
    )


def cpu_readings(pids: Mapping[str, int]) -> dict[str, float]:
    """One CPU reading of each service (with its workers), of Postgres + Redis, and of the machine."""
    values = {name: tree_cpu_seconds(pid) for name, pid in pids.items()}
    values["lag client"] = process_cpu_s(os.getpid())
    values["postgres+redis"] = named_cpu_s(BACKING_PROCESSES)
    values["machine"] = machine_busy_s()
    return values


def describe(result: Mapping[str, Any]) -> str:
    """One fixed-rate result (with its CPU shares) as a line of text."""
    visible = ", ".join(f"{address} p50 {v['p50']} / p99 {v['p99']} ms" for address, v in result["visible_ms"].items())
    cpu = ", ".join(f"{name} {share:.2f}" for name, share in result["cpu_cores"].items())
    per_command = ", ".join(f"{name} {ms:.2f}" for name, ms in result["cpu_ms_per_command"].items())
    return (
        f"{result['rate']:g} {result['command']}/s: reply p50 {result['reply_ms']['p50']} / "
        f"p99 {result['reply_ms']['p99']} ms; visible {visible}; cores used: {cpu}; "
        f"CPU ms per command: {per_command}"
    )


def rate_summary(report: Mapping[str, Any], rate: float, cpu: Mapping[str, float]) -> dict[str, Any]:
    """The figures of one fixed-rate run: reply and visible p50/p99, the cores each process used, and per command."""
    commands = report.get("command_latency_ms") or {}
    per_replica = report.get("per_replica") or {}
    return {
        "rate": rate,
        "command": report.get("command"),
        "commands": report.get("commands"),
        "errors": report.get("errors") or {},
        "reply_ms": {"p50": commands.get("p50"), "p99": commands.get("p99")},
        "visible_ms": {
            address: {"p50": figures["latency_ms"]["p50"], "p99": figures["latency_ms"]["p99"]}
            for address, figures in per_replica.items()
            if isinstance(figures, dict) and figures.get("visible")
        },
        "cpu_cores": dict(cpu),
        # A core's share at `rate` commands/s is that many CPU-ms per command over 1000 ms.
        "cpu_ms_per_command": {name: round(share * 1000.0 / rate, 2) for name, share in cpu.items()},
    }


def parse_rates(text: str) -> list[float]:
    """'40,80,136' → [40.0, 80.0, 136.0]; every rate must be positive."""
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"rates must be numbers separated by commas, not {text!r}") from None
    if not rates or any(rate <= 0 for rate in rates):
        raise argparse.ArgumentTypeError("give at least one rate, each above 0")
    return rates


def _addresses(text: str) -> list[str]:
    addresses = [part.strip() for part in text.split(",") if part.strip()]
    if not addresses:
        raise argparse.ArgumentTypeError("give at least one HOST:PORT")
    return addresses


@dataclass(frozen=True, slots=True)
class Target:
    """Where to measure: addresses, and the service processes' pids when the stack is ours."""

    write: str
    reads: list[str]
    pids: dict[str, int]


@asynccontextmanager
async def own_stack(servers: Backing, command: str) -> AsyncIterator[Target]:
    """A measured stack of the lag tool's own on `servers`, removed afterwards."""
    async with scratch(servers, "lag") as place:
        with bench_stack(place, relays=1, readers=2, env=FAST_HASHING, saga=command == "place_order") as stack:
            pids = {process.name: process.pid for process in stack.processes if process.pid is not None}
            yield Target(stack.write_address, list(stack.read_addresses), pids)


async def at_rates(
    target: Target,
    command: str,
    rates: Sequence[float],
    duration_s: float,
    say: Callable[[str], None],
    *,
    visible_within_s: float = 30.0,
) -> list[dict[str, Any]]:
    """One open-model run per rate on `target`, each with the cores every process used meanwhile."""
    results = []
    for rate in rates:
        before, started = cpu_readings(target.pids), time.monotonic()
        result = await measure_lag(
            target.write,
            target.reads,
            command=command,
            rate=rate,
            duration_s=duration_s,
            visible_within_s=visible_within_s,
            progress_out=None,
        )
        cpu = shares(before, cpu_readings(target.pids), time.monotonic() - started)
        report = lag_report(
            result, write=target.write, reads=target.reads, command=command, rate=rate, duration_s=duration_s
        )
        summary = rate_summary(report, rate, cpu)
        say(describe(summary))
        results.append(summary)
    return results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", help="write service HOST:PORT (omit to start a stack of its own)")
    parser.add_argument("--read", type=_addresses, help="replica HOST:PORT[,HOST:PORT…] (with --write)")
    parser.add_argument("--command", choices=sorted(LAG_COMMANDS), default="register_user")
    parser.add_argument("--orders", action="store_true", help="the same as --command place_order")
    schedule = parser.add_mutually_exclusive_group()
    schedule.add_argument("-n", "--count", type=int, help="commands one after another (default 1000)")
    schedule.add_argument("--rate", type=float, help="commands per second, open model (with --duration)")
    schedule.add_argument("--rates", type=parse_rates, help="several open-model rates on one stack, with CPU shares")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per rate (with --rate / --rates)")
    parser.add_argument("--visible-within", type=float, default=30.0, help="per-command deadline, s")
    parser.add_argument("--token", help="bearer token sent as `authorization: Bearer …`")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--plot", type=Path, help="draw percentiles and lag over time to this PNG (one schedule)")
    parser.add_argument("--fail-on-errors", action="store_true", help="exit 1 when any command or query failed")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, measure, print the figures."""
    parser = _parser()
    args = parser.parse_args(argv)
    command = "place_order" if args.orders else args.command
    if args.duration <= 0 or (args.rate is not None and args.rate <= 0):
        parser.error("--rate and --duration must be above 0")
    if args.rates and args.write:
        parser.error("--rates reads the CPU of the stack's processes: it needs a stack of its own (no --write)")
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
    count = 1000 if args.count is None else args.count

    async def once(target: Target, rate: float | None) -> dict[str, object]:
        result = await measure_lag(
            target.write,
            target.reads,
            command=command,
            rate=rate,
            duration_s=args.duration if rate is not None else 0.0,
            count=count,
            metadata=metadata,
            visible_within_s=args.visible_within,
        )
        for code, details in sorted(result.first_errors.items()):
            print(f"first {code}: {details}", file=sys.stderr)
        return lag_report(
            result, write=target.write, reads=target.reads, command=command, rate=rate, duration_s=args.duration
        )

    async def measured(target: Target) -> dict[str, Any] | list[dict[str, Any]]:
        if not args.rates:
            return await once(target, args.rate)

        def say(line: str) -> None:
            print(line, flush=True)

        return await at_rates(target, command, args.rates, args.duration, say, visible_within_s=args.visible_within)

    async def run() -> dict[str, Any] | list[dict[str, Any]]:
        if args.write:
            return await measured(Target(args.write, args.read or ["127.0.0.1:50052", "127.0.0.1:50053"], {}))
        with backing() as servers:
            async with own_stack(servers, command) as target:
                return await measured(target)

    try:
        # On the services' runtime (uvloop, imports out of the collector's reach): a full
        # collection walking every import would show as commit → visible lag.
        outcome = runtime.run(run())
    except KeyboardInterrupt:
        return 130
    if isinstance(outcome, list):
        if args.json:
            write_json(args.json, {"runs": outcome})
        return 0
    print_summary(outcome, sys.stdout)
    if args.json:
        write_json(args.json, outcome)
    if args.plot:
        from perf.report import plot_report

        plot_report(outcome, args.plot, title=f"lag · {command} → {len(outcome['targets'])} replica(s)")
    if outcome["ok"] == 0:
        print("no command became visible", file=sys.stderr)
        return 1
    return 1 if args.fail_on_errors and outcome["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
