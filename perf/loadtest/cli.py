"""Load testing: seed a stack, then drive its read replicas, its write service, or measure replica lag.

    python -m perf loadtest seed --write 127.0.0.1:50051 --users 1000 --products 200 --orders 500 --out seed.json
    python -m perf loadtest read --target 127.0.0.1:50052,127.0.0.1:50053 --seed seed.json \\
        --rate 2000 --duration 30 --json read.json --plot read.png
    python -m perf loadtest write --write 127.0.0.1:50051 --command add_product --concurrency 32 --duration 10
    python -m perf loadtest lag --write 127.0.0.1:50051 --read 127.0.0.1:50052,127.0.0.1:50053 \\
        --rate 50 --duration 10

`--rate R` is the open model: requests are due at fixed intervals and latency counts from when
each was due, so queueing cannot hide (no coordinated omission). `--concurrency C` is the
closed model: C calls in flight, each sent when the previous one returns. Every mode prints
requests/s, p50/p90/p99/p99.9/max and errors by gRPC status code, a progress line on stderr
once per second, and optionally JSON (`--json`) and a PNG (`--plot`). It exits 1 when no call
succeeded (and with `--fail-on-errors` when any failed), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from perf.lag import LAG_COMMANDS, lag_report, measure_lag
from perf.loadtest import engine as python_engine
from perf.loadtest.probe import NotVisible, wait_for_seed
from perf.loadtest.requests import DEFAULT_MIX, WRITE_METHODS, SeedData, parse_mix
from perf.loadtest.schedule import effective_processes, split_evenly
from perf.loadtest.seed import SeedError, count_rows, seed, write_seed_file
from perf.loadtest.worker import Plan
from perf.report import build_report, print_summary, write_json

# How long `read` waits for the seeded items to be visible on every target before it measures.
SEED_VISIBLE_WITHIN_S = 60.0
PYTHON_VERIFIED_BY = "python gRPC client: each call's own status code"


def _addresses(text: str) -> list[str]:
    addresses = [part.strip() for part in text.split(",") if part.strip()]
    for address in addresses:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise argparse.ArgumentTypeError(f"{address!r} is not HOST:PORT")
    if not addresses:
        raise argparse.ArgumentTypeError("give at least one HOST:PORT")
    return addresses


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be positive")
    return value


def _whole(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text} must be at least {minimum}")
    return value


def _positive_int(text: str) -> int:
    return _whole(text, 1)


def _count(text: str) -> int:
    return _whole(text, 0)


def _metadata(token: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []


def _load_options(parser: argparse.ArgumentParser, *, processes: bool = True) -> None:
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--rate", type=_positive_float, help="requests per second, open model")
    model.add_argument("--concurrency", type=_positive_int, help="calls in flight, closed model (default 64)")
    parser.add_argument("--duration", type=_positive_float, required=True, help="measuring window, seconds")
    if processes:
        parser.add_argument(
            "--processes", type=_positive_int, default=os.cpu_count() or 1, help="client processes (default: cores)"
        )
        parser.add_argument("--connections", type=_positive_int, default=2, help="connections per target per process")
    parser.add_argument("--timeout", type=_positive_float, default=10.0, help="per-call deadline, seconds")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--plot", type=Path, help="draw percentiles and latency over time to this PNG")
    parser.add_argument("--token", help="bearer token sent as `authorization: Bearer …`")
    parser.add_argument("--fail-on-errors", action="store_true", help="exit 1 when any call failed")


def parser() -> argparse.ArgumentParser:
    """The command line."""
    top = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = top.add_subparsers(dest="mode", required=True)

    seeding = modes.add_parser("seed", help="create users, products and orders through the write API")
    seeding.add_argument("--write", type=_addresses, required=True, help="write service HOST:PORT")
    seeding.add_argument("--users", type=_count, default=1000)
    seeding.add_argument("--products", type=_count, default=200)
    seeding.add_argument("--orders", type=_count, default=500)
    seeding.add_argument("--concurrency", type=_positive_int, help="commands in flight (default 16, 64 with --bulk)")
    seeding.add_argument("--bulk", action="store_true", help="more commands in flight over more connections")
    seeding.add_argument("--database-url", help="also count the seeded rows in this Postgres database")
    seeding.add_argument("--token", help="bearer token sent as `authorization: Bearer …`")
    seeding.add_argument("--out", type=Path, required=True, help="where to write the ids (JSON)")

    reading = modes.add_parser("read", help="drive the query services of one or more replicas")
    reading.add_argument("--target", type=_addresses, required=True, help="HOST:PORT[,HOST:PORT…], round-robin")
    reading.add_argument("--seed", type=Path, required=True, help="the file `seed` wrote")
    reading.add_argument("--mix", default=DEFAULT_MIX, help=f"query kinds and weights (default {DEFAULT_MIX})")
    reading.add_argument("--hot", action="store_true", help="always the same key (the near cache's hit path)")
    reading.add_argument("--engine", choices=("python", "h2load"), default="python")
    reading.add_argument("--no-wait", action="store_true", help="do not wait for the seed to be visible first")
    reading.add_argument(
        "--metrics-url",
        help="with h2load: the targets' Prometheus endpoints (http://HOST:PORT/metrics[,…]); the servers' call "
        "counts by status code, before and after, go into the JSON as a second check",
    )
    _load_options(reading)

    writing = modes.add_parser("write", help="drive the write service with unique commands")
    writing.add_argument("--write", type=_addresses, required=True, help="write service HOST:PORT")
    writing.add_argument("--command", choices=sorted(WRITE_METHODS), default="add_product")
    writing.add_argument(
        "--hot", action="store_true", help="restock_product: every command on one product (a hot aggregate)"
    )
    _load_options(writing)

    lagging = modes.add_parser("lag", help="reply → visible on each replica")
    lagging.add_argument("--write", type=_addresses, required=True, help="write service HOST:PORT")
    lagging.add_argument("--read", type=_addresses, required=True, help="replica HOST:PORT[,HOST:PORT…]")
    lagging.add_argument("--command", choices=sorted(LAG_COMMANDS), default="register_user")
    lagging.add_argument("--rate", type=_positive_float, default=50.0, help="commands per second (open model)")
    lagging.add_argument("--duration", type=_positive_float, required=True, help="seconds of commands")
    lagging.add_argument("--visible-within", type=_positive_float, default=30.0, help="per-command deadline, s")
    lagging.add_argument("--json", type=Path)
    lagging.add_argument("--plot", type=Path)
    lagging.add_argument("--token")
    lagging.add_argument("--fail-on-errors", action="store_true")
    return top


def python_plans(
    args: argparse.Namespace, mode: str, targets: list[str], **fields: object
) -> tuple[list[Plan], int | None]:
    """One plan per client process; the closed model's total concurrency (None for the open model)."""
    concurrency = None if args.rate is not None else (args.concurrency or 64)
    processes = effective_processes(args.processes, concurrency)
    shares = split_evenly(concurrency, processes) if concurrency is not None else [None] * processes
    plans = [
        Plan(
            mode=mode,
            targets=targets,
            process_index=index,
            processes=processes,
            duration_s=args.duration,
            rate=args.rate,
            concurrency=share,
            connections=args.connections,
            timeout_s=args.timeout,
            metadata=_metadata(args.token),
            **fields,  # type: ignore[arg-type]
        )
        for index, share in enumerate(shares)
    ]
    return plans, concurrency


def _finish(args: argparse.Namespace, report: dict[str, object], title: str) -> int:
    print_summary(report, sys.stdout)
    if args.json:
        write_json(args.json, report)
    if args.plot:
        from perf.report import plot_report

        plot_report(report, args.plot, title=title)
    errors = report["errors"]
    assert isinstance(errors, dict)
    if report["ok"] == 0:
        print("no call succeeded", file=sys.stderr)
        return 1
    return 1 if args.fail_on_errors and errors else 0


def _first_errors(first: dict[str, str]) -> None:
    for code, details in sorted(first.items()):
        print(f"first {code}: {details}", file=sys.stderr)


def cmd_seed(args: argparse.Namespace) -> int:
    """`seed`."""
    concurrency = args.concurrency or (64 if args.bulk else 16)
    connections = 4 if args.bulk else 2
    print(
        f"seeding {args.users} users, {args.products} products, {args.orders} orders through {args.write[0]} "
        f"({concurrency} in flight)",
        file=sys.stderr,
    )
    try:
        seeded = asyncio.run(
            seed(
                args.write[0],
                users=args.users,
                products=args.products,
                orders=args.orders,
                concurrency=concurrency,
                connections=connections,
                metadata=_metadata(args.token),
            )
        )
    except SeedError as error:
        print(f"seeding failed: {error}", file=sys.stderr)
        return 1
    write_seed_file(args.out, seeded)
    print(
        f"seeded {len(seeded.users)} users, {len(seeded.products)} products, {len(seeded.orders)} orders "
        f"({seeded.retries} retries) → {args.out}"
    )
    if args.database_url:
        counts = asyncio.run(count_rows(args.database_url, seeded))
        print("rows in Postgres: " + ", ".join(f"{table} {count}" for table, count in counts.items()))
        expected = {"users": len(seeded.users), "products": len(seeded.products), "orders": len(seeded.orders)}
        if counts != expected:
            print(f"Postgres holds {counts}, expected {expected}", file=sys.stderr)
            return 1
    return 0


def cmd_read(args: argparse.Namespace) -> int:
    """`read`."""
    try:
        mix = parse_mix(args.mix)
        seed_data = SeedData.load(args.seed)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    missing = [kind for kind in mix if not seed_data.ids_for(kind)]
    if missing:
        print(f"error: the seed file has no ids for {', '.join(missing)}", file=sys.stderr)
        return 2
    if not args.no_wait and seed_data.probes:
        try:
            asyncio.run(wait_for_seed(args.target, seed_data.probes, _metadata(args.token), SEED_VISIBLE_WITHIN_S))
        except NotVisible as error:
            print(
                f"the seed is not visible on every target: {error} (pass --no-wait to measure anyway)", file=sys.stderr
            )
            return 1
        except grpc.RpcError as error:  # e.g. refused: the run then counts the errors by code
            print(f"could not check the seed's visibility ({error}); measuring anyway", file=sys.stderr)
    if args.engine == "h2load":
        from perf.loadtest import h2load

        try:
            report = h2load.run_read(args, mix, seed_data)
        except h2load.H2loadError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return _finish(args, report, "read · h2load")
    plans, concurrency = python_plans(args, "read", args.target, seed_path=str(args.seed), mix=mix, hot=args.hot)
    return _run_python(
        args,
        "read",
        args.target,
        plans,
        concurrency,
        verified_by=PYTHON_VERIFIED_BY,
        extra={"mix": mix, "hot": args.hot},
        title=f"read · {'hot key' if args.hot else 'mix'} · python engine",
    )


def _run_python(
    args: argparse.Namespace,
    mode: str,
    targets: list[str],
    plans: list[Plan],
    concurrency: int | None,
    *,
    verified_by: str,
    extra: dict[str, object],
    title: str,
) -> int:
    """Run `plans` on the python engine, then report and finish like every mode does."""
    result = asyncio.run(python_engine.run_processes(plans))
    _first_errors(result.first_errors)
    report = build_report(
        mode=mode,
        engine="python",
        targets=targets,
        processes=len(plans),
        rate=args.rate,
        concurrency=concurrency,
        duration_s=args.duration,
        timeline=result.timeline,
        elapsed_s=result.elapsed_s,
        verified_by=verified_by,
        extra={
            **extra,
            "connected_channels": f"{result.connected}/{result.channels}",
            **({"command_retries": result.retries} if mode == "write" else {}),
        },
    )
    return _finish(args, report, title)


def cmd_write(args: argparse.Namespace) -> int:
    """`write`."""
    metadata = _metadata(args.token)
    product_ids: list[str] = []
    if args.command == "restock_product":
        product_ids = asyncio.run(_restock_targets(args.write[0], metadata, count=1 if args.hot else 32))
    plans, concurrency = python_plans(args, "write", args.write, command=args.command, product_ids=product_ids)
    return _run_python(
        args,
        "write",
        args.write,
        plans,
        concurrency,
        verified_by=PYTHON_VERIFIED_BY + "; every command with its own idempotency key",
        extra={"command": args.command, "hot": args.hot},
        title=f"write · {args.command}{' · one product' if args.hot else ''} · python engine",
    )


async def _restock_targets(address: str, metadata: Sequence[tuple[str, str]], count: int = 32) -> list[str]:
    """Products for restock_product to spread its commands over (fewer would make them queue on row locks)."""
    seeded = await seed(address, users=0, products=count, orders=0, metadata=metadata, out=None)
    return [item["product_id"] for item in seeded.products]


def cmd_lag(args: argparse.Namespace) -> int:
    """`lag`."""
    result = asyncio.run(
        measure_lag(
            args.write[0],
            args.read,
            command=args.command,
            rate=args.rate,
            duration_s=args.duration,
            metadata=_metadata(args.token),
            visible_within_s=args.visible_within,
        )
    )
    _first_errors(result.first_errors)
    report = lag_report(
        result, write=args.write[0], reads=args.read, command=args.command, rate=args.rate, duration_s=args.duration
    )
    return _finish(args, report, f"lag · {args.command} → {len(args.read)} replica(s)")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the mode."""
    args = parser().parse_args(argv)
    handlers = {"seed": cmd_seed, "read": cmd_read, "write": cmd_write, "lag": cmd_lag}
    try:
        return handlers[args.mode](args)
    except python_engine.EngineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
