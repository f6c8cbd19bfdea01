"""Measure order saga throughput: orders per second confirmed through the whole stack.

Places N orders (1 to 3 items each, products with ample stock) through the write service,
C at a time, with the payment provider at 0 latency and no injected failures, and waits
until the saga workers have confirmed every one. Throughput is confirmed orders divided by
the time from the first PlaceOrder to the last confirmation (read from Postgres), so it
includes placing the orders. Also reports the PlaceOrder→confirmed time per order, and the CPU
milliseconds per order the saga workers, the write service and the payment provider used over
the measured window (figures that a busy machine moves far less than the rate).
With --backlog the orders are placed first and the workers started afterwards: the figure is
then the saga workers' own rate of draining a backlog, whatever PlaceOrder costs.

    python -m perf saga -n 500 -c 16 --saga-workers 2 --json results/saga.json

It starts its own stack (write service, one relay, one replica, the provider and the saga
workers) on free ports, over DATABASE_URL / REDIS_URL when set (migrating that database)
or embedded servers otherwise, and stops it afterwards (deleting its keys from that Redis).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from devstack.supervisor import ServiceProcess, Stack
from perf.cpu import tree_cpu_seconds
from perf.report import write_json
from perf.stack import tool_stack, tool_stack_config
from tessera.catalog.v1 import catalog_command_service_pb2 as catalog
from tessera.catalog.v1 import catalog_command_service_pb2_grpc as catalog_grpc
from tessera.common.v1.money_pb2 import Money
from tessera.orders.v1 import order_command_service_pb2 as orders
from tessera.orders.v1 import order_command_service_pb2_grpc as orders_grpc
from tessera.orders.v1 import order_pb2
from tessera.users.v1 import user_command_service_pb2 as users
from tessera.users.v1 import user_command_service_pb2_grpc as users_grpc

CALL_S = 10.0
ADDRESS = order_pb2.Address(
    recipient="Load Test", line1="1 Throughput Road", city="Berlin", postal_code="10115", country_code="DE"
)


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of `values` (fraction in 0..1)."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


async def _setup(channel: grpc.aio.Channel, customers: int, products: int) -> tuple[list[str], list[str]]:
    run = secrets.token_hex(3)
    user_stub = users_grpc.UserCommandServiceStub(channel)
    catalog_stub = catalog_grpc.CatalogCommandServiceStub(channel)
    customer_ids = []
    for i in range(customers):
        reply = await user_stub.RegisterUser(
            users.RegisterUserRequest(
                email=f"saga-{run}-{i}@example.com",
                username=f"saga{run}{i}",
                password="correct horse battery staple",  # noqa: S106 - a throwaway load-test account
                full_name=f"Saga Load {i}",
            ),
            timeout=CALL_S,
        )
        customer_ids.append(reply.user_id)
    skus = []
    for i in range(products):
        sku = f"LOAD-{run}-{i}".upper()
        await catalog_stub.AddProduct(
            catalog.AddProductRequest(
                sku=sku,
                name=f"Load item {i}",
                price=Money(currency_code="EUR", amount_minor=100 + i),
                initial_stock=1_000_000_000,
            ),
            timeout=CALL_S,
        )
        skus.append(sku)
    return customer_ids, skus


async def measure(
    write: str,
    database_url: str,
    *,
    count: int,
    concurrency: int,
    timeout_s: float,
    start_workers: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """Place `count` orders, wait until all are confirmed, and return the figures.

    With `start_workers`, the orders are placed while no saga worker runs, then the workers are
    started and the figures describe how fast they drain that backlog.
    """
    rng = random.Random(1)  # noqa: S311 - workload shape, not security
    pool: asyncpg.Pool[Any] = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    async with grpc.aio.insecure_channel(write) as channel:
        customers, skus = await _setup(channel, 20, 30)
        stub = orders_grpc.OrderCommandServiceStub(channel)
        placed_at: dict[uuid.UUID, float] = {}
        gate = asyncio.Semaphore(concurrency)

        async def place() -> None:
            items = [
                orders.OrderItem(sku=sku, quantity=rng.randint(1, 3)) for sku in rng.sample(skus, rng.randint(1, 3))
            ]
            async with gate:
                reply = await stub.PlaceOrder(
                    orders.PlaceOrderRequest(customer_id=rng.choice(customers), items=items, shipping_address=ADDRESS),
                    timeout=CALL_S,
                )
            placed_at[uuid.UUID(reply.order_id)] = time.time()

        started = time.time()
        await asyncio.gather(*(place() for _ in range(count)))
        placing_s = time.time() - started
        if start_workers is not None:
            await start_workers()
        deadline = time.monotonic() + timeout_s
        ids = list(placed_at)
        while True:
            rows = await pool.fetch(
                "SELECT o.id, o.status, extract(epoch FROM s.updated_at) AS done FROM orders o"
                " JOIN saga_executions s ON s.order_id = o.id WHERE o.id = ANY($1::uuid[]) AND s.status <> 'running'",
                ids,
            )
            if len(rows) == len(ids):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(ids) - len(rows)} sagas still running after {timeout_s} s")
            await asyncio.sleep(0.05)
        first_step = await pool.fetchval(
            "SELECT extract(epoch FROM min(s.at)) FROM saga_steps s JOIN saga_executions e ON e.id = s.saga_id"
            " WHERE e.order_id = ANY($1::uuid[])",
            ids,
        )
    await pool.close()
    confirmed = [row for row in rows if row["status"] == "confirmed"]
    finished = max(float(row["done"]) for row in rows)
    latencies = [(float(row["done"]) - placed_at[row["id"]]) * 1000 for row in confirmed]
    # Draining a backlog: from the first step any worker took to the last saga's end.
    elapsed = finished - (float(first_step) if start_workers is not None else started)
    return {
        "mode": "backlog" if start_workers is not None else "pipelined",
        "orders": count,
        "confirmed": len(confirmed),
        "concurrency": concurrency,
        "placing_s": round(placing_s, 3),
        "elapsed_s": round(elapsed, 3),
        "confirmed_per_s": round(len(confirmed) / elapsed, 1),
        "place_to_confirmed_median_ms": round(statistics.median(latencies), 1),
        "place_to_confirmed_p99_ms": round(percentile(latencies, 0.99), 1),
    }


def process_cpu(stack: Stack) -> dict[str, float]:
    """CPU seconds so far of the saga workers, the write service and the payment provider (with any children)."""

    def used(processes: list[ServiceProcess | None]) -> float:
        return sum(tree_cpu_seconds(p.pid) for p in processes if p is not None and p.pid is not None)

    return {
        "saga_workers": used(list(stack.saga_workers)),
        "write_service": used([stack.write]),
        "payment_provider": used([stack.provider]),
    }


def cpu_ms_per_order(before: dict[str, float], after: dict[str, float], orders: int) -> dict[str, float]:
    """CPU milliseconds per order of each process between two `process_cpu` readings."""
    return {name: round((after[name] - before[name]) * 1000 / orders, 2) for name in after}


def main() -> int:
    """Parse arguments, start a stack, measure, print."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--count", type=int, default=500, help="orders to place")
    parser.add_argument("-c", "--concurrency", type=int, default=16, help="PlaceOrder calls in flight")
    parser.add_argument("--saga-workers", type=int, default=1, help="saga worker processes")
    parser.add_argument("--saga-concurrency", type=int, default=16, help="sagas each worker drives at once")
    parser.add_argument("--timeout", type=float, default=300.0, help="most seconds to wait for the sagas")
    parser.add_argument(
        "--backlog",
        action="store_true",
        help="place every order first, then start the saga workers and time how fast they drain the backlog",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()

    config = tool_stack_config(
        "saga",
        relays=1,
        read_ports=(0,),
        payment_provider=True,
        saga_workers=0 if args.backlog else args.saga_workers,
        saga_env={"SAGA_CONCURRENCY": str(args.saga_concurrency)},
        provider_env={"PAYMENT_LATENCY_MS": "0"},
    )
    with tool_stack(config) as stack:
        cpu_before = process_cpu(stack)

        async def start_workers() -> None:
            nonlocal cpu_before
            await asyncio.gather(*(asyncio.to_thread(stack.add_saga_worker) for _ in range(args.saga_workers)))
            cpu_before = process_cpu(stack)  # the workers' start-up is not theirs to drain

        report = asyncio.run(
            measure(
                stack.write_address,
                stack.database_url,
                count=args.count,
                concurrency=args.concurrency,
                timeout_s=args.timeout,
                start_workers=start_workers if args.backlog else None,
            )
        )
        cpu_after = process_cpu(stack)
        report["cpu_ms_per_order"] = cpu_ms_per_order(cpu_before, cpu_after, args.count)
    report["saga_workers"] = args.saga_workers
    report["saga_concurrency"] = args.saga_concurrency
    print(
        f"[{report['mode']}] {report['confirmed']}/{report['orders']} orders confirmed in {report['elapsed_s']} s "
        f"({report['saga_workers']} saga worker(s) x {report['saga_concurrency']}, {report['concurrency']} placing): "
        f"{report['confirmed_per_s']} orders/s; PlaceOrder→confirmed "
        f"median {report['place_to_confirmed_median_ms']} ms, p99 {report['place_to_confirmed_p99_ms']} ms"
    )
    cpu = report["cpu_ms_per_order"]
    print("CPU ms per order: " + ", ".join(f"{name} {value}" for name, value in cpu.items()))
    if args.json:
        write_json(args.json, report)
    return 0 if report["confirmed"] == report["orders"] else 1


if __name__ == "__main__":
    sys.exit(main())
