"""Seeding: users, products (with stock) and orders created through the write API, several calls in flight.

Every command carries an idempotency key, so a call retried after UNAVAILABLE or a deadline
cannot act twice. `--bulk` only keeps more calls in flight over more connections: the data
goes through the same command handlers and SQL as any client's, and the services' own
settings (e.g. the cheap password hashing of a development stack) decide how fast it is.
With `--database-url` the tool also counts the seeded rows in Postgres at the end.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO, TypeVar

from perf.loadtest.requests import PASSWORD, add_product_request, bearer_token
from tessera.orders.v1 import order_command_service_pb2 as order_commands
from tessera.orders.v1 import order_pb2
from tessera.users.v1 import user_command_service_pb2 as user_commands
from tessera_client import ChannelOptions, TesseraClient, TesseraError

R = TypeVar("R")

CALL_TIMEOUT_S = 30.0
PRODUCT_STOCK = 1_000_000_000
# Items whose visibility `read` waits for (with their consistency tokens) before it measures.
PROBES_PER_KIND = 5


class SeedError(RuntimeError):
    """A command failed for good; the message names it and the status code."""


@dataclass
class Seeded:
    """What was created, in the shape of the seed file."""

    users: list[dict[str, str]] = field(default_factory=list)
    products: list[dict[str, str]] = field(default_factory=list)
    orders: list[dict[str, str]] = field(default_factory=list)
    probes: list[tuple[str, str, str]] = field(default_factory=list)
    retries: int = 0

    def to_json(self) -> dict[str, object]:
        """The seed file's content."""
        return {
            "counts": {"users": len(self.users), "products": len(self.products), "orders": len(self.orders)},
            "users": self.users,
            "products": self.products,
            "orders": self.orders,
            "probes": [list(probe) for probe in self.probes],
        }


class Caller:
    """Commands through the client library over a few connections (one client each), round robin.

    The client retries UNAVAILABLE, DEADLINE_EXCEEDED and ABORTED under one idempotency key per
    command while CALL_TIMEOUT_S allows, so a retry never acts twice.
    """

    def __init__(self, address: str, connections: int, metadata: Sequence[tuple[str, str]]) -> None:
        """Open `connections` clients to `address` (commands only: no read channel, no session)."""
        token = bearer_token(metadata)
        own_connection = ChannelOptions(extra=(("grpc.use_local_subchannel_pool", 1),))
        self.clients = [
            TesseraClient(address, None, token=token, options=own_connection, timeout=CALL_TIMEOUT_S, session=False)
            for _ in range(connections)
        ]
        self.turn = 0

    def next(self) -> TesseraClient:
        """The client for the next command."""
        self.turn += 1
        return self.clients[self.turn % len(self.clients)]

    @property
    def retries(self) -> int:
        """Attempts the clients repeated."""
        return sum(client.command_retries for client in self.clients)

    async def close(self) -> None:
        """Close the clients."""
        for client in self.clients:
            await client.close()


async def _command(call: Awaitable[R]) -> R:
    """The command's reply; SeedError naming the method and the status when it failed for good."""
    try:
        return await call
    except TesseraError as error:
        raise SeedError(f"{error.method} failed: {error.code.name}: {error.message}") from error


async def _run_all(
    what: str, count: int, concurrency: int, make: Callable[[int], Awaitable[None]], out: TextIO | None
) -> None:
    """Run make(0..count-1) with `concurrency` in flight, printing progress once per second."""
    numbers = iter(range(count))
    done = 0
    started = time.monotonic()

    async def worker() -> None:
        nonlocal done
        for number in numbers:
            await make(number)
            done += 1

    async def progress() -> None:
        while True:
            await asyncio.sleep(1.0)
            if out is not None:
                elapsed = time.monotonic() - started
                out.write(f"  {what}: {done}/{count} ({done / elapsed:.0f}/s)\n")
                out.flush()

    ticker = asyncio.create_task(progress())
    try:
        await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, count)))))
    finally:
        ticker.cancel()
    if out is not None and count:
        elapsed = time.monotonic() - started
        out.write(f"  {what}: {done} created in {elapsed:.1f} s ({done / max(elapsed, 1e-6):.0f}/s)\n")
        out.flush()


async def seed(
    write_address: str,
    *,
    users: int,
    products: int,
    orders: int,
    concurrency: int = 16,
    connections: int = 2,
    metadata: Sequence[tuple[str, str]] = (),
    out: TextIO | None = sys.stderr,
) -> Seeded:
    """Create the users, products and orders; the ids and a few consistency tokens."""
    if orders and (not users or not products):
        raise SeedError("orders need at least one user and one product")
    run_id = secrets.token_hex(4)
    rng = random.Random(run_id)  # noqa: S311 - picking customers and items, not security
    caller = Caller(write_address, connections, metadata)
    seeded = Seeded()
    try:

        async def user(number: int) -> None:
            request = user_commands.RegisterUserRequest(
                email=f"seed-{run_id}-{number}@example.com",
                username=f"seed{run_id}n{number}",
                password=PASSWORD,
                full_name=f"Seed User {number}",
            )
            reply = await _command(caller.next().users.register_user(request))
            seeded.users.append({"user_id": reply.user_id, "token": reply.consistency_token})

        async def product(number: int) -> None:
            sku = f"SEED-{run_id}-{number}"
            request = add_product_request(
                sku, f"Seed product {number}", stock=PRODUCT_STOCK, price_minor=100 + number % 900
            )
            reply = await _command(caller.next().catalog.add_product(request))
            seeded.products.append({"product_id": reply.product_id, "sku": sku, "token": reply.consistency_token})

        address = order_pb2.Address(
            recipient="Seed Customer", line1="1 Main St", city="Berlin", postal_code="10115", country_code="DE"
        )

        async def order(number: int) -> None:
            customer = rng.choice(seeded.users)["user_id"]
            picked = rng.sample(seeded.products, k=min(len(seeded.products), rng.randint(1, 2)))
            request = order_commands.PlaceOrderRequest(
                customer_id=customer,
                items=[order_commands.OrderItem(sku=item["sku"], quantity=1 + number % 3) for item in picked],
                shipping_address=address,
            )
            reply = await _command(caller.next().orders.place_order(request))
            seeded.orders.append(
                {"order_id": reply.order_id, "customer_id": customer, "token": reply.consistency_token}
            )

        await _run_all("users", users, concurrency, user, out)
        await _run_all("products", products, concurrency, product, out)
        await _run_all("orders", orders, concurrency, order, out)
    finally:
        seeded.retries = caller.retries
        await caller.close()
    for kind, items, key in (
        ("get_user", seeded.users, "user_id"),
        ("get_product", seeded.products, "product_id"),
        ("get_order", seeded.orders, "order_id"),
    ):
        # The last ones created are the last the views receive.
        seeded.probes += [(kind, item[key], item["token"]) for item in items[-PROBES_PER_KIND:]]
    return seeded


async def count_rows(database_url: str, seeded: Seeded) -> dict[str, int]:
    """How many of the seeded users, products and orders Postgres holds."""
    import asyncpg

    connection = await asyncpg.connect(database_url, timeout=10)
    try:
        counts: dict[str, int] = {}
        for table, items, key in (
            ("users", seeded.users, "user_id"),
            ("products", seeded.products, "product_id"),
            ("orders", seeded.orders, "order_id"),
        ):
            ids = [uuid.UUID(item[key]) for item in items]
            # The table name comes from the fixed tuple above, never from input.
            counts[table] = int(await connection.fetchval(f"SELECT count(*) FROM {table} WHERE id = ANY($1)", ids))  # noqa: S608
        return counts
    finally:
        await connection.close()


def write_seed_file(path: Path, seeded: Seeded) -> None:
    """Write the seed file, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(seeded.to_json()) + "\n", encoding="utf-8")
