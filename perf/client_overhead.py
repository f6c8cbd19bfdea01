"""Measure what the client library adds to a call: unary GetUser through tessera_client against
the same call on a raw generated stub, both to the same replica, in one run.

Starts a stack with one read replica (Postgres and Redis from DATABASE_URL / REDIS_URL when
set, embedded servers otherwise), registers one user, then alternates blocks of sequential
calls (one call in flight, so latency is what is measured, not throughput): the raw stub on a
plain channel, then the client (metadata, trace injection, session lookup, typed-error
wrapping, its channel with service config and keepalive). It prints the median and p99 of
each and their differences.

    python -m perf client-overhead --rounds 10 --calls 200
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

import grpc

from devstack.supervisor import Stack
from perf.stack import tool_stack, tool_stack_config
from tessera.users.v1 import user_query_service_pb2 as users_q
from tessera.users.v1 import user_query_service_pb2_grpc as users_q_grpc
from tessera_client import TesseraClient


def _quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(stack: Stack, rounds: int, calls: int) -> dict[str, object]:
    """Alternate raw and client blocks; the figures in microseconds."""
    replica = stack.read_addresses[0]
    raw_samples: list[float] = []
    client_samples: list[float] = []
    async with (
        TesseraClient(stack.write_address, [replica], timeout=10.0) as client,
        grpc.aio.insecure_channel(replica) as channel,
    ):
        tag = secrets.token_hex(4)
        user = await client.users.register_user(
            email=f"ovh{tag}@example.com",
            username=f"ovh{tag}",
            password="correct horse battery",  # noqa: S106
            full_name="O",
        )
        await client.users.get_user(user_id=user.user_id)  # visible on the replica from here on
        if client.session is not None:
            client.session.forget()  # so both paths send the very same request
        stub = users_q_grpc.UserQueryServiceStub(channel)
        request = users_q.GetUserRequest(user_id=user.user_id)
        for _ in range(calls):  # warm both paths
            await stub.GetUser(request, timeout=10.0)
            await client.users.get_user(request)
        for _ in range(rounds):
            for _ in range(calls):
                start = time.perf_counter()
                await stub.GetUser(request, timeout=10.0)
                raw_samples.append(time.perf_counter() - start)
            for _ in range(calls):
                start = time.perf_counter()
                await client.users.get_user(request)
                client_samples.append(time.perf_counter() - start)

    def us(value: float) -> float:
        return round(value * 1e6, 1)

    raw_median, client_median = statistics.median(raw_samples), statistics.median(client_samples)
    raw_p99, client_p99 = _quantile(raw_samples, 0.99), _quantile(client_samples, 0.99)
    return {
        "calls_each": len(raw_samples),
        "raw_median_us": us(raw_median),
        "client_median_us": us(client_median),
        "median_overhead_us": us(client_median - raw_median),
        "raw_p99_us": us(raw_p99),
        "client_p99_us": us(client_p99),
        "p99_overhead_us": us(client_p99 - raw_p99),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def main() -> int:
    """Start the stack, measure, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="alternating blocks of each kind")
    parser.add_argument("--calls", type=int, default=200, help="sequential calls per block")
    args = parser.parse_args()
    config = tool_stack_config("overhead", read_ports=(0,), relays=1)
    with tool_stack(config) as stack:
        report = asyncio.run(measure(stack, args.rounds, args.calls))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
