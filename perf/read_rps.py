"""Measure the read throughput of one replica with 1 and with 2 worker processes, in one run.

Starts a stack without replicas (write service and a relay; Postgres and Redis from
DATABASE_URL / REDIS_URL when set, embedded servers otherwise), registers users through the
write service, then for each worker count starts one replica with READ_WORKERS set to it and
drives GetUser on random seeded users at full speed from several client processes (one Python
client process cannot saturate a server). Every client process opens several connections of its
own, so the kernel spreads them over the workers of the replica, keeps many calls in flight and
counts the calls completed inside a common measuring window. It prints calls per second for each
worker count and their ratio, and optionally writes JSON.

    python -m perf read-workers                 # or: make bench-read
    python -m perf read-workers --workers 1 --workers 2 --workers 4 --duration 10

Figures depend on the cores the machine has: the client processes share them with the replica.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import redis

from devstack.supervisor import ServiceProcess, Stack, StackConfig
from perf.cpu import tree_cpu_seconds
from shared_kernel.runtime import run
from tessera.users.v1 import user_command_service_pb2 as commands
from tessera.users.v1 import user_command_service_pb2_grpc as commands_grpc
from tessera.users.v1 import user_query_service_pb2 as queries

GET_USER = "/tessera.users.v1.UserQueryService/GetUser"
REPLICA_HEADER = "x-tessera-replica"
FAST_HASHING = {"ARGON2_TIME_COST": "1", "ARGON2_MEMORY_COST_KIB": "1024", "ARGON2_PARALLELISM": "1"}
# Calls run this long before the measuring window opens, once every client process is connected.
WARM_UP_S = 1.0
# Most time the client processes may take to start and connect.
CLIENT_START_TIMEOUT_S = 60.0


# --- one client process -------------------------------------------------------------------


async def drive(
    address: str, user_ids: Sequence[str], *, duration_s: float, connections: int, in_flight: int
) -> dict[str, int]:
    """Call GetUser back to back from `in_flight` loops over `connections` channels; count the window's calls.

    Once connected it prints `ready` and reads the window's opening time (epoch seconds) from
    stdin, so that every client process measures the same window.
    """
    # Requests are serialized once and replies left as bytes: the client spends its time on calls.
    requests = [queries.GetUserRequest(user_id=user_id).SerializeToString() for user_id in user_ids]
    channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(connections)
    ]
    counts = {"ok": 0}
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), CLIENT_START_TIMEOUT_S)
        print("ready", flush=True)
        start_at = float(await asyncio.to_thread(sys.stdin.readline))
        end_at = start_at + duration_s
        methods: list[grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = [
            channel.unary_unary(GET_USER) for channel in channels
        ]

        async def loop(index: int) -> None:
            call = methods[index % len(methods)]
            pick = random.Random(index).choice  # noqa: S311 - load spreading, not security
            while (now := time.time()) < end_at:
                try:
                    await call(pick(requests), timeout=10)
                    outcome = "ok"
                except grpc.aio.AioRpcError as error:
                    outcome = error.code().name
                    if outcome not in counts:
                        print(f"first {outcome}: {error.details()}", file=sys.stderr, flush=True)
                finished = time.time()
                if now >= start_at and finished <= end_at:
                    counts[outcome] = counts.get(outcome, 0) + 1

        await asyncio.gather(*(loop(index) for index in range(in_flight)))
    finally:
        for channel in channels:
            await channel.close()
    return counts


async def _client_main(args: argparse.Namespace, user_ids: Sequence[str]) -> int:
    counts = await drive(
        args.client,
        user_ids,
        duration_s=args.duration,
        connections=args.connections,
        in_flight=args.in_flight,
    )
    print(json.dumps(counts), flush=True)
    return 0


# --- the orchestration ----------------------------------------------------------------------


async def seed_users(write_address: str, count: int, concurrency: int = 16) -> list[str]:
    """Register `count` users through the write service; return their ids."""
    run_id = secrets.token_hex(4)
    ids: list[str] = []
    async with grpc.aio.insecure_channel(write_address) as channel:
        stub: commands_grpc.UserCommandServiceAsyncStub = commands_grpc.UserCommandServiceStub(channel)
        numbers = iter(range(count))

        async def worker() -> None:
            for number in numbers:
                reply = await stub.RegisterUser(
                    commands.RegisterUserRequest(
                        email=f"rps-{run_id}-{number}@example.com",
                        username=f"rps{run_id}{number}",
                        password="correct horse battery staple",  # noqa: S106 - a throwaway benchmark account
                        full_name=f"Bench User {number}",
                    ),
                    timeout=30,
                )
                ids.append(reply.user_id)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ids


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


def measure_replica(
    stack: Stack, workers: int, ids_file: Path, *, clients: int, connections: int, in_flight: int, duration_s: float
) -> dict[str, float | int | str]:
    """Start a replica with `workers` workers, load it from `clients` processes, stop it; the figures."""
    replica = ServiceProcess.python_module(
        f"read-{workers}w",
        "read_service",
        env={**stack.service_env(), "READ_WORKERS": str(workers), "LOG_LEVEL": "WARNING"},
        grpc_port=0,
        log_path=stack.log_dir / f"read-{workers}w.log",
    )
    with replica:
        seen = asyncio.run(distinct_workers(replica.address))
        argv = [
            sys.executable,
            "-m",
            "perf.read_rps",
            "--client",
            replica.address,
            "--ids-file",
            str(ids_file),
            "--duration",
            str(duration_s),
            "--connections",
            str(connections),
            "--in-flight",
            str(in_flight),
        ]
        processes = [
            subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(clients)
        ]
        try:
            for process in processes:
                assert process.stdout is not None
                if process.stdout.readline().strip() != "ready":
                    raise RuntimeError("a client process failed to connect")
            start_at = time.time() + WARM_UP_S
            for process in processes:
                assert process.stdin is not None
                process.stdin.write(f"{start_at!r}\n")
                process.stdin.flush()
            # CPU the replica (all its processes) used during the window, in cores.
            assert replica.pid is not None
            time.sleep(max(0.0, start_at - time.time()))
            cpu_before = tree_cpu_seconds(replica.pid)
            time.sleep(max(0.0, start_at + duration_s - time.time()))
            replica_cores = (tree_cpu_seconds(replica.pid) - cpu_before) / duration_s
            outputs = [process.communicate(timeout=WARM_UP_S + duration_s + 60)[0] for process in processes]
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        totals: dict[str, int] = {}
        for process, out in zip(processes, outputs, strict=True):
            if process.returncode != 0:
                raise RuntimeError(f"a client process failed with code {process.returncode}")
            for key, value in json.loads(out.strip().splitlines()[-1]).items():
                totals[key] = totals.get(key, 0) + int(value)
    calls = totals.pop("ok", 0)
    return {
        "workers": workers,
        "workers_answering": seen,
        "calls": calls,
        "errors": sum(totals.values()),
        "error_codes": ", ".join(f"{code} {count}" for code, count in sorted(totals.items())) or "none",
        "rps": round(calls / duration_s, 1),
        "replica_cpu_cores": round(replica_cores, 2),
        # Load-independent: what one core of the replica delivers, whatever else runs on the machine.
        "calls_per_replica_cpu_second": round(calls / duration_s / replica_cores) if replica_cores > 0 else 0,
    }


def benchmark(args: argparse.Namespace) -> dict[str, object]:
    """Seed, then measure every worker count (`rounds` times, alternating); the report."""
    load_at_start = round(os.getloadavg()[0], 2)
    config = StackConfig(
        database_url=os.environ.get("DATABASE_URL"),
        redis_url=os.environ.get("REDIS_URL"),
        redis_key_prefix=f"rps:{secrets.token_hex(4)}:",
        read_ports=(),
        relays=1,
        env={**FAST_HASHING, "LOG_LEVEL": "WARNING"},
    )
    try:
        return {**_benchmark(config, args, load_at_start), "redis_key_prefix": config.redis_key_prefix}
    finally:
        if config.redis_url:
            delete_prefix(config.redis_url, config.redis_key_prefix)


def delete_prefix(redis_url: str, prefix: str) -> None:
    """Remove the run's keys from a Redis server that outlives it."""
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    finally:
        client.close()


def _benchmark(config: StackConfig, args: argparse.Namespace, load_at_start: float) -> dict[str, object]:
    with Stack(config) as stack, tempfile.TemporaryDirectory(prefix="tessera-rps-") as scratch:
        print(f"seeding {args.users} users …", flush=True)
        ids_file = Path(scratch) / "user-ids.txt"
        ids_file.write_text("\n".join(asyncio.run(seed_users(stack.write_address, args.users))) + "\n")
        rounds: dict[int, list[dict[str, float | int | str]]] = {workers: [] for workers in args.workers}
        for round_number in range(1, args.rounds + 1):
            for workers in args.workers:
                result = measure_replica(
                    stack,
                    workers,
                    ids_file,
                    clients=args.clients,
                    connections=args.connections,
                    in_flight=args.in_flight,
                    duration_s=args.duration,
                )
                rounds[workers].append(result)
                print(
                    f"round {round_number}: {workers} worker(s): {result['rps']:.0f} calls/s "
                    f"(errors: {result['error_codes']}; {result['workers_answering']} worker(s) answering; "
                    f"replica used {result['replica_cpu_cores']} cores, "
                    f"{result['calls_per_replica_cpu_second']} calls per CPU-second)",
                    flush=True,
                )
    rps = {workers: statistics.median(float(r["rps"]) for r in results) for workers, results in rounds.items()}
    base = rps[args.workers[0]]
    return {
        "cores": os.cpu_count(),
        "load_average_1m_at_start": load_at_start,
        "users": args.users,
        "client_processes": args.clients,
        "connections_per_client": args.connections,
        "calls_in_flight_per_client": args.in_flight,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "rps": {str(workers): value for workers, value in rps.items()},
        "replica_cpu_cores": {
            str(workers): statistics.median(float(r["replica_cpu_cores"]) for r in results)
            for workers, results in rounds.items()
        },
        "calls_per_replica_cpu_second": {
            str(workers): statistics.median(float(r["calls_per_replica_cpu_second"]) for r in results)
            for workers, results in rounds.items()
        },
        "ratio_to_first": {str(workers): round(value / base, 2) if base else None for workers, value in rps.items()},
        "runs": {str(workers): results for workers, results in rounds.items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments; run as the orchestrator, or as one client process (`--client`)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, action="append", help="worker counts to compare (default: 1 and 2)")
    parser.add_argument("--users", type=int, default=1000, help="users to seed")
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--connections", type=int, default=4, help="connections per client process")
    parser.add_argument("--in-flight", type=int, default=64, help="calls in flight per client process")
    parser.add_argument("--duration", type=float, default=10.0, help="measuring window, seconds")
    parser.add_argument("--rounds", type=int, default=1, help="measure each worker count this many times")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--ids-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        return run(_client_main(args, Path(args.ids_file).read_text().split()))
    args.workers = args.workers or [1, 2]
    report = benchmark(args)
    print(f"GetUser calls/s, one replica, {args.clients} client processes, {args.duration:g} s window:")
    rps, ratios, cores = report["rps"], report["ratio_to_first"], report["replica_cpu_cores"]
    assert isinstance(rps, dict) and isinstance(ratios, dict) and isinstance(cores, dict)
    for workers, value in rps.items():
        print(
            f"  {workers} worker(s): {value:>10.1f} calls/s   x{ratios[workers]}   replica CPU {cores[workers]} cores"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
