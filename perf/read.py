"""Read throughput: the project's one read measurement, each figure beside a ceiling of the same run.

    python -m perf read --duration 10 --json results/read_bench.json
    python -m perf read --workers 1,2 [--rounds 3]           # or: make bench-read

It starts (a) a bare grpc.aio server (perf.loadtest.bare_server: the services' runtime and
server options, no interceptors, a constant GetUser reply of a real reply's size) and (b) a
stack with a write service and a relay (Postgres and Redis from DATABASE_URL / REDIS_URL when
set, embedded servers otherwise) and seeds users through the write API. One server at a time
runs while it is measured: the bare server, a read replica with the near cache on
(NEAR_CACHE_SIZE), a read replica with it off (NEAR_CACHE_SIZE=0). With one engine (h2load
when installed, else the multi-process python engine), closed model, it measures the most
GetUser calls per second of:

- the bare server;
- the replica with the near cache, always the same user (the near cache's hit path);
- the replica without the near cache, seeded users (each call reads Redis; with h2load every
  client process repeats one user of its own, since h2load sends one body per run);

then drives the replica without the near cache at half its measured maximum with the python
engine's open model (h2load has none) over random seeded users, and reports p50/p99 there.
The services run with AUTH_MODE=insecure unless `--auth`, which mints a token and sends it.
With `--defaults` it measures only the bare server and a replica as `make up` starts it (its
default near cache, random seeded users; add `--auth` for `make up`'s authentication).
With `--workers 1,2` it measures instead one replica per worker count (READ_WORKERS), one
after another (`--rounds` alternates them), each driven with GetUser on random seeded users by
the python engine's closed model from several client processes, and reports calls/s, how
many workers answered, the cores the replica used (all its processes, over the measuring window) and calls
per replica CPU-second, with each count's ratio to the first.
Figures depend on the machine: the client processes share its cores with the servers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from devstack.supervisor import ServiceProcess, Stack, StackConfig
from perf.cpu import tree_cpu_seconds
from perf.loadtest import engine as python_engine
from perf.loadtest import h2load
from perf.loadtest.probe import wait_for_seed
from perf.loadtest.schedule import effective_processes, split_evenly
from perf.loadtest.seed import seed, write_seed_file
from perf.loadtest.stats import Histogram
from perf.loadtest.worker import Plan
from perf.report import write_json
from perf.stack import clear_prefix, tool_stack_config

NEAR_CACHE_ON = "100000"
# Requests each client sends, unmeasured, before a maximum-rate measurement (connections, caches, Redis pool).
WARM_UP_REQUESTS = 2000
REPLICA_HEADER = "x-tessera-replica"


async def distinct_workers(address: str, connections: int = 40) -> int:
    """How many worker processes answer over `connections` fresh connections (by their replica header)."""
    seen: set[str] = set()
    health = "/grpc.health.v1.Health/Check"
    for _ in range(connections):
        async with grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            check: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(health)
            call = check(b"", timeout=5)
            await call
            seen.update(str(value) for key, value in await call.initial_metadata() if key == REPLICA_HEADER)
    return len(seen)


def measure_max(
    engine: str, target: str, ids: Sequence[str], seed_file: Path, *, hot: bool, args: argparse.Namespace,
    metadata: Sequence[tuple[str, str]], scratch: Path,
) -> dict[str, object]:  # fmt: skip
    """The most GetUser calls/s `target` answered (closed model); figures and how they were verified."""
    if engine == "h2load":
        runs = h2load.plan_runs(
            [target], "get_user", ids, processes=args.processes, concurrency=args.concurrency,
            connections=args.connections, hot=hot,
        )  # fmt: skip
        h2load.execute(runs, args.duration, metadata, scratch, progress=False, warm_up_requests=WARM_UP_REQUESTS)
        _timeline, latencies, errors, ok, elapsed = h2load.figures(runs, args.duration)
        verified = h2load.verified_by(runs)
    else:
        processes = effective_processes(args.processes, args.concurrency)
        plans = [
            Plan(
                mode="read", targets=[target], process_index=index, processes=processes,
                duration_s=args.duration, concurrency=share, seed_path=str(seed_file), mix={"get_user": 1}, hot=hot,
                connections=args.connections, metadata=list(metadata),
            )
            for index, share in enumerate(split_evenly(args.concurrency, processes))
        ]  # fmt: skip
        result = asyncio.run(python_engine.run_processes(plans, progress_out=None))
        total = result.total
        latencies, errors, ok, elapsed = total.latencies, total.errors, total.latencies.count, result.elapsed_s
        verified = "python gRPC client: each call's own status code"
    return {
        "rps": round(ok / elapsed, 1) if elapsed else 0.0,
        "ok": ok,
        "errors": errors,
        "latency_ms": latencies.summary(),
        "verified_by": verified,
    }


def half_rate(target: str, rate: float, seed_file: Path, args: argparse.Namespace,
              metadata: Sequence[tuple[str, str]]) -> dict[str, object]:  # fmt: skip
    """Latency of `target` at `rate` calls/s, open model, random seeded users, python engine."""
    plans = [
        Plan(
            mode="read", targets=[target], process_index=index, processes=args.processes, duration_s=args.duration,
            rate=rate, seed_path=str(seed_file), mix={"get_user": 1}, connections=args.connections,
            metadata=list(metadata),
        )
        for index in range(args.processes)
    ]  # fmt: skip
    result = asyncio.run(python_engine.run_processes(plans, progress_out=None))
    total = result.total
    latencies: Histogram = total.latencies
    return {
        "rps": round(latencies.count / result.elapsed_s, 1) if result.elapsed_s else 0.0,
        "errors": total.errors,
        "latency_ms": latencies.summary(),
        # One bad second (a pause somewhere) and steady queueing give the same p99; these tell them apart.
        "p99_ms_by_second": [round(p99, 2) for _second, _calls, _p50, p99 in result.timeline.rows()],
    }


def benchmark(args: argparse.Namespace) -> dict[str, object]:
    """Start everything, measure, stop; the figures."""
    engine = "h2load" if h2load.h2load_path() is not None and not args.python else "python"
    notes: list[str] = []
    half: dict[str, object]
    load_at_start = round(os.getloadavg()[0], 2)
    config = _stack_config(args, "readbench")
    try:
        with Stack(config) as stack, tempfile.TemporaryDirectory(prefix="tessera-read-bench-") as scratch_dir:
            scratch = Path(scratch_dir)
            metadata = stack.auth_metadata()
            say(f"seeding {args.users} users …")
            seeded = asyncio.run(seed(stack.write_address, users=args.users, products=0, orders=0,
                                      concurrency=32, metadata=metadata, out=None))  # fmt: skip
            seed_file = scratch / "seed.json"
            write_seed_file(seed_file, seeded)
            ids = [user["user_id"] for user in seeded.users]
            env = {**stack.service_env(), "LOG_LEVEL": "WARNING"}
            bare = ServiceProcess.python_module(
                "bare", "perf.loadtest.bare_server", env=env, grpc_port=0, log_path=stack.log_dir / "bare.log"
            )
            hot = ServiceProcess.python_module(
                "read-near-cache", "read_service", env={**env, "NEAR_CACHE_SIZE": NEAR_CACHE_ON}, grpc_port=0,
                log_path=stack.log_dir / "read-near-cache.log",
            )  # fmt: skip
            cold = ServiceProcess.python_module(
                "read-no-cache", "read_service", env={**env, "NEAR_CACHE_SIZE": "0"}, grpc_port=0,
                log_path=stack.log_dir / "read-no-cache.log",
            )  # fmt: skip
            defaults = ServiceProcess.python_module(
                "read-defaults", "read_service", env=env, grpc_port=0, log_path=stack.log_dir / "read-defaults.log"
            )
            figures: dict[str, dict[str, object]] = {}
            cold_rps, rate, half = 0.0, 1.0, {}
            runs: tuple[tuple[str, ServiceProcess, bool], ...] = (
                ("bare", bare, True),
                ("hot", hot, True),
                ("cold", cold, False),
            )
            if args.defaults:
                runs = (("bare", bare, True), ("defaults", defaults, False))
            # One server at a time, so that none takes CPU from the one measured.
            for name, process, is_hot in runs:
                with process:
                    if name != "bare":
                        unreachable = asyncio.run(wait_for_seed([process.address], seeded.probes, metadata, 60.0))
                        if unreachable:
                            raise RuntimeError(f"cannot connect to {process.address}")
                    say(f"measuring {name} ({engine}, {args.duration:g} s, {args.concurrency} in flight) …")
                    figures[name] = measure_max(
                        engine, process.address, ids, seed_file, hot=is_hot, args=args, metadata=metadata,
                        scratch=scratch,
                    )  # fmt: skip
                    say(f"  {name}: {figures[name]['rps']} calls/s, errors {figures[name]['errors'] or 'none'}")
                    if name == "cold":
                        cold_rps = float(str(figures["cold"]["rps"]))
                        rate = max(1.0, round(cold_rps / 2))
                        say(f"half rate: {rate:g} calls/s open model on the replica without near cache …")
                        half = half_rate(cold.address, rate, seed_file, args, metadata)
    finally:
        if config.redis_url:
            asyncio.run(clear_prefix(config.redis_url, config.redis_key_prefix))
    bare_rps = float(str(figures["bare"]["rps"]))
    if args.defaults:
        return defaults_report(args, engine, figures, load_at_start)
    hot_rps = float(str(figures["hot"]["rps"]))
    if engine == "h2load":
        notes.append(
            "cold: h2load sends one body per run, so each of its processes repeats one seeded user of its own; "
            "with the near cache off every call still reads Redis"
        )
    else:
        notes.append("cold: every call picks a random seeded user")
    notes += [
        "hot: near cache on (NEAR_CACHE_SIZE=" + NEAR_CACHE_ON + "), always the same user: the near cache's hit path",
        "half rate: python engine, open model (h2load has no request-rate model), random seeded users",
        f"{os.cpu_count()} cores shared by clients and servers; load average {load_at_start} at the start",
        "auth: " + ("bearer token minted by the stack" if args.auth else "services run with AUTH_MODE=insecure"),
    ]
    return {
        "engine": engine,
        "bare_rps": bare_rps,
        "hot_rps": hot_rps,
        "cold_rps": cold_rps,
        "hot_ratio": round(hot_rps / bare_rps, 3) if bare_rps else None,
        "cold_ratio": round(cold_rps / bare_rps, 3) if bare_rps else None,
        "half_rate_rps": rate,
        "half_rate_achieved_rps": half["rps"],
        "half_rate_latency_ms": half["latency_ms"],
        "half_rate_errors": half["errors"],
        "half_rate_p99_ms_by_second": half.get("p99_ms_by_second", []),
        "runs": figures,
        "duration_s": args.duration,
        "concurrency": args.concurrency,
        "processes": args.processes,
        "users": args.users,
        "notes": notes,
    }


def _stack_config(args: argparse.Namespace, prefix: str) -> StackConfig:
    """A write service and a relay, no replica: each measurement starts the servers it measures."""
    return tool_stack_config(prefix, read_ports=(), relays=1, auth=args.auth)


def one_worker_count(
    stack: Stack, workers: int, seeded_probes: Sequence[tuple[str, str, str]], seed_file: Path,
    args: argparse.Namespace,
) -> dict[str, object]:  # fmt: skip
    """Start a replica with `workers` workers, drive it at full speed (closed model), stop it; the figures."""
    metadata = stack.auth_metadata()
    replica = ServiceProcess.python_module(
        f"read-{workers}w", "read_service",
        env={**stack.service_env(), "READ_WORKERS": str(workers), "LOG_LEVEL": "WARNING"},
        grpc_port=0, log_path=stack.log_dir / f"read-{workers}w.log",
    )  # fmt: skip
    with replica:
        if asyncio.run(wait_for_seed([replica.address], seeded_probes, metadata, 60.0)):
            raise RuntimeError(f"cannot connect to {replica.address}")
        seen = asyncio.run(distinct_workers(replica.address))
        processes = effective_processes(args.processes, args.concurrency)
        plans = [
            Plan(
                mode="read", targets=[replica.address], process_index=index, processes=processes,
                duration_s=args.duration, concurrency=share, seed_path=str(seed_file), mix={"get_user": 1},
                connections=args.connections, metadata=list(metadata),
            )
            for index, share in enumerate(split_evenly(args.concurrency, processes))
        ]  # fmt: skip
        assert replica.pid is not None
        pid, window = replica.pid, {}

        def read_cpu(start_at: float) -> None:
            # The replica's CPU over the measuring window alone, not the clients' start-up.
            time.sleep(max(0.0, start_at - time.time()))
            before = tree_cpu_seconds(pid)
            time.sleep(max(0.0, start_at + args.duration - time.time()))
            window["cpu_s"] = tree_cpu_seconds(pid) - before

        readers: list[threading.Thread] = []

        def window_opens(start_at: float) -> None:
            readers.append(threading.Thread(target=read_cpu, args=(start_at,), daemon=True))
            readers[-1].start()

        result = asyncio.run(python_engine.run_processes(plans, progress_out=None, window_opens=window_opens))
        for reader in readers:
            reader.join(timeout=args.duration + 5.0)
    cpu_s = window.get("cpu_s", 0.0)
    total = result.total
    calls, elapsed = total.latencies.count, result.elapsed_s
    return {
        "workers": workers,
        "workers_answering": seen,
        "calls": calls,
        "errors": sum(total.errors.values()),
        "error_codes": ", ".join(f"{code} {count}" for code, count in sorted(total.errors.items())) or "none",
        "rps": round(calls / elapsed, 1) if elapsed else 0.0,
        "latency_ms": total.latencies.summary(),
        "replica_cpu_cores": round(cpu_s / args.duration, 2),
        # Load-independent: what one core of the replica delivers, whatever else runs on the machine.
        "calls_per_replica_cpu_second": round(calls / cpu_s) if cpu_s > 0 else 0,
    }


def workers_benchmark(args: argparse.Namespace) -> dict[str, object]:
    """Seed, then measure every worker count (`rounds` times, alternating); the report."""
    load_at_start = round(os.getloadavg()[0], 2)
    config = _stack_config(args, "rps")
    rounds: dict[int, list[dict[str, object]]] = {workers: [] for workers in args.workers}
    try:
        with Stack(config) as stack, tempfile.TemporaryDirectory(prefix="tessera-read-workers-") as scratch_dir:
            say(f"seeding {args.users} users …")
            seeded = asyncio.run(seed(stack.write_address, users=args.users, products=0, orders=0,
                                      concurrency=32, metadata=stack.auth_metadata(), out=None))  # fmt: skip
            seed_file = Path(scratch_dir) / "seed.json"
            write_seed_file(seed_file, seeded)
            for round_number in range(1, args.rounds + 1):
                for workers in args.workers:
                    result = one_worker_count(stack, workers, seeded.probes, seed_file, args)
                    rounds[workers].append(result)
                    say(
                        f"round {round_number}: {workers} worker(s): {result['rps']} calls/s "
                        f"(errors: {result['error_codes']}; {result['workers_answering']} worker(s) answering; "
                        f"replica used {result['replica_cpu_cores']} cores, "
                        f"{result['calls_per_replica_cpu_second']} calls per CPU-second)"
                    )
    finally:
        if config.redis_url:
            asyncio.run(clear_prefix(config.redis_url, config.redis_key_prefix))

    def median(key: str) -> dict[str, float]:
        return {
            str(workers): statistics.median(float(str(run[key])) for run in runs) for workers, runs in rounds.items()
        }

    rps = median("rps")
    base = rps[str(args.workers[0])]
    return {
        "cores": os.cpu_count(),
        "load_average_1m_at_start": load_at_start,
        "users": args.users,
        "client_processes": effective_processes(args.processes, args.concurrency),
        "connections_per_client": args.connections,
        "calls_in_flight": args.concurrency,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "rps": rps,
        "replica_cpu_cores": median("replica_cpu_cores"),
        "calls_per_replica_cpu_second": median("calls_per_replica_cpu_second"),
        "ratio_to_first": {workers: round(value / base, 2) if base else None for workers, value in rps.items()},
        "runs": {str(workers): runs for workers, runs in rounds.items()},
        "redis_key_prefix": config.redis_key_prefix,
    }


def parse_counts(text: str) -> list[int]:
    """'1,2' → [1, 2]; every count at least 1."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"worker counts are whole numbers separated by commas, not {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("give at least one worker count, each at least 1")
    return counts


def defaults_report(
    args: argparse.Namespace, engine: str, figures: dict[str, dict[str, object]], load_at_start: float
) -> dict[str, object]:
    """The figures of a `--defaults` run: the bare server and a replica with `make up`'s settings."""
    bare_rps = float(str(figures["bare"]["rps"]))
    defaults_rps = float(str(figures["defaults"]["rps"]))
    return {
        "engine": engine,
        "bare_rps": bare_rps,
        "defaults_rps": defaults_rps,
        "defaults_ratio": round(defaults_rps / bare_rps, 3) if bare_rps else None,
        "runs": figures,
        "duration_s": args.duration,
        "concurrency": args.concurrency,
        "processes": args.processes,
        "users": args.users,
        "notes": [
            "defaults: the replica's own settings (near cache at its default size), random seeded users",
            "auth: " + ("bearer token minted by the stack" if args.auth else "services run with AUTH_MODE=insecure"),
            f"{os.cpu_count()} cores shared by clients and servers; load average {load_at_start} at the start",
        ],
    }


def _print_workers(report: dict[str, object], args: argparse.Namespace) -> int:
    rps, ratios, cores = report["rps"], report["ratio_to_first"], report["replica_cpu_cores"]
    assert isinstance(rps, dict) and isinstance(ratios, dict) and isinstance(cores, dict)
    print(f"GetUser calls/s, one replica, {args.concurrency} in flight, {args.duration:g} s:")
    for workers, value in rps.items():
        print(
            f"  {workers} worker(s): {value:>10.1f} calls/s   x{ratios[workers]}   replica CPU {cores[workers]} cores"
        )
    if args.json:
        write_json(args.json, report)
    return 0


def say(message: str) -> None:
    """Progress on stderr."""
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, benchmark, print and write the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--users", type=int, default=1000, help="users to seed")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight for the maximum runs")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="client processes")
    parser.add_argument("--connections", type=int, default=2, help="connections per client process")
    parser.add_argument("--python", action="store_true", help="use the python engine even when h2load is installed")
    parser.add_argument("--auth", action="store_true", help="run the services with AUTH_MODE=required")
    parser.add_argument("--defaults", action="store_true", help="only the bare server and a replica with its defaults")
    parser.add_argument("--workers", type=parse_counts, help="instead: one replica per worker count, e.g. 1,2")
    parser.add_argument("--rounds", type=int, default=1, help="with --workers: measure each count this many times")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.users < 1 or args.concurrency < 1 or args.processes < 1 or args.connections < 1:
        parser.error("--duration, --users, --concurrency, --processes and --connections must be positive")
    if args.workers:
        return _print_workers(workers_benchmark(args), args)
    try:
        report = benchmark(args)
    except h2load.H2loadError as error:
        say(f"error: {error}")
        return 1
    if args.defaults:
        print(f"GetUser calls/s: bare {report['bare_rps']}, replica defaults {report['defaults_rps']}")
        if args.json:
            write_json(args.json, report)
        return 0
    latency = report["half_rate_latency_ms"]
    assert isinstance(latency, dict)
    print(f"GetUser calls/s, engine {report['engine']}, {args.duration:g} s each, {args.concurrency} in flight:")
    print(f"  bare grpc.aio server        {report['bare_rps']:>10}")
    print(f"  replica, near cache hit     {report['hot_rps']:>10}   x{report['hot_ratio']} of bare")
    print(f"  replica, no near cache      {report['cold_rps']:>10}   x{report['cold_ratio']} of bare")
    print(f"  at half that ({report['half_rate_rps']}/s, open model): p50 {latency['p50']} ms, p99 {latency['p99']} ms")
    if args.json:
        write_json(args.json, report)
    else:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
