"""Measure the time from a command's reply to its effect being visible on each read replica.

Registers N users one after another through the write service (or, with `--orders`,
places N orders for one customer while the saga workers run); after each reply it queries
every replica (GetUser, GetOrder) in a tight loop until the new aggregate is there, and
records reply→visible per replica. Prints median, p90, p99 and max, and optionally writes JSON.

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
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from tessera.catalog.v1 import catalog_command_service_pb2 as catalog
from tessera.catalog.v1 import catalog_command_service_pb2_grpc as catalog_grpc
from tessera.common.v1 import money_pb2
from tessera.orders.v1 import order_command_service_pb2 as orders
from tessera.orders.v1 import order_command_service_pb2_grpc as orders_grpc
from tessera.orders.v1 import order_pb2
from tessera.orders.v1 import order_query_service_pb2 as order_queries
from tessera.orders.v1 import order_query_service_pb2_grpc as order_queries_grpc
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


async def _wait_visible(lookup: Callable[[], Awaitable[object]], what: str, deadline: float) -> float:
    while True:
        try:
            await lookup()
        except grpc.aio.AioRpcError as error:
            if error.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                raise
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{what} not visible within the deadline") from error
            continue
        return time.perf_counter()


# Issues command number i and returns a lookup per replica channel that fails until its effect is visible.
Probe = Callable[[int], Awaitable[Callable[[grpc.aio.Channel], Callable[[], Awaitable[object]]]]]


async def _user_probe(write: grpc.aio.Channel, run: str) -> Probe:
    stub = commands_grpc.UserCommandServiceStub(write)

    async def issue(i: int) -> Callable[[grpc.aio.Channel], Callable[[], Awaitable[object]]]:
        reply = await stub.RegisterUser(
            commands.RegisterUserRequest(
                email=f"lag-{run}-{i}@example.com",
                username=f"lag{run}{i}",
                password="correct horse battery staple",  # noqa: S106 - a throwaway probe account
                full_name=f"Lag Probe {i}",
            ),
            timeout=10.0,
        )
        request = queries.GetUserRequest(user_id=reply.user_id)
        return lambda channel: lambda: queries_grpc.UserQueryServiceStub(channel).GetUser(request, timeout=2.0)

    return issue


async def _order_probe(write: grpc.aio.Channel, run: str) -> Probe:
    """One customer and one product with stock for every order; then PlaceOrder per command."""
    customer = await commands_grpc.UserCommandServiceStub(write).RegisterUser(
        commands.RegisterUserRequest(
            email=f"lag-{run}@example.com",
            username=f"lag{run}",
            password="correct horse battery staple",  # noqa: S106 - a throwaway probe account
            full_name="Lag Probe",
        ),
        timeout=10.0,
    )
    sku = f"LAG-{run}"
    await catalog_grpc.CatalogCommandServiceStub(write).AddProduct(
        catalog.AddProductRequest(
            sku=sku,
            name="Lag probe",
            price=money_pb2.Money(currency_code="EUR", amount_minor=100),
            initial_stock=1_000_000_000,
        ),
        timeout=10.0,
    )
    stub = orders_grpc.OrderCommandServiceStub(write)
    address = order_pb2.Address(
        recipient="Lag Probe", line1="1 Main St", city="Berlin", postal_code="10115", country_code="DE"
    )

    async def issue(_: int) -> Callable[[grpc.aio.Channel], Callable[[], Awaitable[object]]]:
        reply = await stub.PlaceOrder(
            orders.PlaceOrderRequest(
                customer_id=customer.user_id,
                items=[orders.OrderItem(sku=sku, quantity=1)],
                shipping_address=address,
            ),
            timeout=10.0,
        )
        request = order_queries.GetOrderRequest(order_id=reply.order_id)
        return lambda channel: lambda: order_queries_grpc.OrderQueryServiceStub(channel).GetOrder(request, timeout=2.0)

    return issue


async def measure(
    write: str, reads: list[str], count: int, timeout_s: float, *, place_orders: bool = False
) -> dict[str, object]:
    """Run the measurement and return the figures per replica, in milliseconds."""
    async with grpc.aio.insecure_channel(write) as write_channel:
        read_channels = [grpc.aio.insecure_channel(address) for address in reads]
        try:
            run = secrets.token_hex(4)
            issue = await (_order_probe if place_orders else _user_probe)(write_channel, run)
            lags: dict[str, list[float]] = {address: [] for address in reads}
            for i in range(count):
                lookup = await issue(i)
                replied = time.perf_counter()
                seen = await asyncio.gather(
                    *(_wait_visible(lookup(channel), f"command {i}", replied + timeout_s) for channel in read_channels)
                )
                for address, when in zip(reads, seen, strict=True):
                    lags[address].append((when - replied) * 1000)
        finally:
            for channel in read_channels:
                await channel.close()
    report: dict[str, object] = {"commands": count, "command": "PlaceOrder" if place_orders else "RegisterUser"}
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
    parser.add_argument("-n", "--count", type=int, default=1000, help="number of commands")
    parser.add_argument("--orders", action="store_true", help="PlaceOrder (saga running) instead of RegisterUser")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-command visibility deadline, seconds")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if args.write:
        reads = args.read or ["127.0.0.1:50052", "127.0.0.1:50053"]
        report = asyncio.run(measure(args.write, reads, args.count, args.timeout, place_orders=args.orders))
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
            report = asyncio.run(
                measure(stack.write_address, reads, args.count, args.timeout, place_orders=args.orders)
            )
    print(f"reply → visible on replica, {report['commands']} {report['command']} commands, sequential:")
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
