"""Measure the time from a command's reply to its effect being visible on each read replica.

Registers N users one after another through the write service; after each reply it
queries every replica (GetUser) in a tight loop until the user is there, and records
reply→visible per replica. Prints median, p90, p99 and max, and optionally writes JSON.

Against a running stack:

    python -m devstack.measure_lag --write 127.0.0.1:50051 --read 127.0.0.1:50052 --read 127.0.0.1:50053

Without --write it starts its own stack (write service, two relays, two replicas) on free
ports, over DATABASE_URL / REDIS_URL when set or embedded servers otherwise, and stops it
afterwards. That stack uses cheap argon2 parameters so the run is quick; the lag is
measured from the reply, so hashing cost does not enter it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import sys
import time
from pathlib import Path

import grpc

from tessera.users.v1 import (
    user_command_service_pb2 as commands,
)
from tessera.users.v1 import (
    user_command_service_pb2_grpc as commands_grpc,
)
from tessera.users.v1 import (
    user_query_service_pb2 as queries,
)
from tessera.users.v1 import (
    user_query_service_pb2_grpc as queries_grpc,
)


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of `values` (fraction in 0..1)."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


async def _wait_visible(stub: queries_grpc.UserQueryServiceAsyncStub, user_id: str, deadline: float) -> float:
    request = queries.GetUserRequest(user_id=user_id)
    while True:
        try:
            await stub.GetUser(request, timeout=2.0)
        except grpc.aio.AioRpcError as error:
            if error.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                raise
            if time.perf_counter() > deadline:
                raise TimeoutError(f"user {user_id} not visible within the deadline") from error
            continue
        return time.perf_counter()


async def measure(write: str, reads: list[str], count: int, timeout_s: float) -> dict[str, object]:
    """Run the measurement and return the figures per replica, in milliseconds."""
    async with grpc.aio.insecure_channel(write) as write_channel:
        read_channels = [grpc.aio.insecure_channel(address) for address in reads]
        try:
            command_stub = commands_grpc.UserCommandServiceStub(write_channel)
            query_stubs = [queries_grpc.UserQueryServiceStub(c) for c in read_channels]
            lags: dict[str, list[float]] = {address: [] for address in reads}
            run = secrets.token_hex(4)
            for i in range(count):
                reply = await command_stub.RegisterUser(
                    commands.RegisterUserRequest(
                        email=f"lag-{run}-{i}@example.com",
                        username=f"lag{run}{i}",
                        password="correct horse battery staple",  # noqa: S106 - a throwaway probe account
                        full_name=f"Lag Probe {i}",
                    ),
                    timeout=10.0,
                )
                replied = time.perf_counter()
                seen = await asyncio.gather(
                    *(_wait_visible(stub, reply.user_id, replied + timeout_s) for stub in query_stubs)
                )
                for address, when in zip(reads, seen, strict=True):
                    lags[address].append((when - replied) * 1000)
        finally:
            for channel in read_channels:
                await channel.close()
    report: dict[str, object] = {"commands": count}
    for address, values in lags.items():
        report[address] = {
            "median_ms": round(statistics.median(values), 3),
            "p90_ms": round(percentile(values, 0.90), 3),
            "p99_ms": round(percentile(values, 0.99), 3),
            "max_ms": round(max(values), 3),
        }
    return report


def main() -> int:
    """Parse arguments, measure, print a table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", help="write service address (omit to start a stack of its own)")
    parser.add_argument("--read", action="append", help="read replica address (repeatable)")
    parser.add_argument("-n", "--count", type=int, default=1000, help="number of RegisterUser commands")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-command visibility deadline, seconds")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if args.write:
        reads = args.read or ["127.0.0.1:50052", "127.0.0.1:50053"]
        report = asyncio.run(measure(args.write, reads, args.count, args.timeout))
    else:
        from devstack.supervisor import Stack, StackConfig

        config = StackConfig(
            database_url=os.environ.get("DATABASE_URL"),
            redis_url=os.environ.get("REDIS_URL"),
            redis_key_prefix=f"lag:{secrets.token_hex(4)}:",
            env={"ARGON2_TIME_COST": "1", "ARGON2_MEMORY_COST_KIB": "1024", "ARGON2_PARALLELISM": "1"},
        )
        with Stack(config) as stack:
            reads = stack.read_addresses
            report = asyncio.run(measure(stack.write_address, reads, args.count, args.timeout))
    print(f"reply → visible on replica, {report['commands']} RegisterUser commands, sequential:")
    print(f"{'replica':<24}{'median ms':>12}{'p90 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for address in reads:
        row = report[address]
        assert isinstance(row, dict)
        print(f"{address:<24}{row['median_ms']:>12}{row['p90_ms']:>10}{row['p99_ms']:>10}{row['max_ms']:>10}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
