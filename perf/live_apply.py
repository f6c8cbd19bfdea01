"""Measure how fast one read replica applies live events: a mixed user/product/order stream.

Starts a replica (in this process) on a fresh database and key space, waits until it serves,
writes N positioned events to the event log, then PUBLISHes their envelopes on the events
channel from another process while the replica's loop is held, so that the whole stream
waits for it as after a write burst, and times how long the replica's projections take from
there to position N. N stays below the replica's live buffer (10,000 messages), so the
figure is the live path, not a catch-up from the log. Besides the wall-clock rate it prints
the events per second of the replica's own CPU time, the figure that holds on a busy machine.

    python -m perf live-apply -n 9000 [--json results/live_apply.json]

Uses DATABASE_URL (an admin DSN: a database is created and dropped) and REDIS_URL (under a key
prefix of its own, deleted afterwards) when set, embedded servers otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from pydantic import SecretStr

from devstack.in_process import replica_settings
from perf.event_log import copy_positioned
from perf.report import write_json
from perf.stack import backing, clear_prefix, scratch_database
from read_service.bootstrap import running_read_service
from read_service.lease import ApplyMode
from read_service.upcasting import current_version
from shared_kernel.contracts.event_log import events_channel
from tessera.catalog.v1.events_pb2 import ProductAdded, StockReserved
from tessera.common.v1.money_pb2 import Money
from tessera.events.v1.envelope_pb2 import EventEnvelope
from tessera.orders.v1.events_pb2 import OrderConfirmed, OrderPlaced
from tessera.orders.v1.order_pb2 import OrderLine
from tessera.users.v1.events_pb2 import UserProfileUpdated, UserRegistered

_BASE = datetime(2025, 1, 1, tzinfo=UTC)


def mixed_events(count: int, seed: int = 11) -> Iterator[tuple[Any, ...]]:
    """`count` outbox rows at positions 1..count: users, products, orders and their follow-ups."""
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not secrets
    users: list[str] = []
    products: list[tuple[str, str, int]] = []  # id, sku, stock
    versions: dict[str, int] = {}
    orders: list[tuple[str, str]] = []  # order id, customer id
    now = datetime.now(UTC)
    for position in range(1, count + 1):
        at = _BASE + timedelta(seconds=position)
        roll = rng.random()
        payload: Any
        if not users or roll < 0.25:
            aggregate_type, aggregate_id = "user", str(uuid.UUID(int=rng.getrandbits(128), version=4))
            n = len(users)
            payload = UserRegistered(
                user_id=aggregate_id, email=f"u{n}@example.com", username=f"u{n}", display_name=f"User {n}"
            )
            payload.registered_at.FromDatetime(at)
            users.append(aggregate_id)
        elif not products or roll < 0.35:
            aggregate_type, aggregate_id = "product", str(uuid.UUID(int=rng.getrandbits(128), version=4))
            sku = f"SKU-{len(products)}"
            payload = ProductAdded(
                product_id=aggregate_id,
                sku=sku,
                name=f"Product {len(products)}",
                price=Money(currency_code="EUR", amount_minor=1000),
                stock_available=1_000_000,
            )
            payload.added_at.FromDatetime(at)
            products.append((aggregate_id, sku, 1_000_000))
        elif roll < 0.5:
            aggregate_type, aggregate_id = "user", rng.choice(users)
            payload = UserProfileUpdated(user_id=aggregate_id, full_name=f"Renamed {position}", bio="bio")
            payload.updated_at.FromDatetime(at)
        elif roll < 0.7 or not orders:
            aggregate_type, aggregate_id = "order", str(uuid.UUID(int=rng.getrandbits(128), version=4))
            customer = rng.choice(users)
            product_id, sku, _ = rng.choice(products)
            price = Money(currency_code="EUR", amount_minor=1000)
            line = OrderLine(
                product_id=product_id,
                sku=sku,
                product_name="Product",
                unit_price=price,
                quantity=1,
                line_total=price,
            )
            payload = OrderPlaced(order_id=aggregate_id, customer_id=customer, lines=[line], total=price)
            payload.placed_at.FromDatetime(at)
            orders.append((aggregate_id, customer))
        elif roll < 0.85:
            index = rng.randrange(len(products))
            aggregate_id, sku, stock = products[index]
            aggregate_type = "product"
            products[index] = (aggregate_id, sku, stock - 1)
            payload = StockReserved(
                product_id=aggregate_id, sku=sku, order_id=orders[-1][0], quantity=1, stock_available=stock - 1
            )
            payload.reserved_at.FromDatetime(at)
        else:
            aggregate_type = "order"
            aggregate_id, _ = orders.pop(rng.randrange(len(orders)))
            payload = OrderConfirmed(order_id=aggregate_id)
            payload.confirmed_at.FromDatetime(at)
        versions[aggregate_id] = versions.get(aggregate_id, 0) + 1
        yield (
            uuid.uuid4(),
            payload.DESCRIPTOR.full_name,
            current_version(payload.DESCRIPTOR.full_name),
            aggregate_type,
            aggregate_id,
            versions[aggregate_id],
            payload.SerializeToString(),
            at,
            position,
            now,
            now,
        )


def _envelope(row: tuple[Any, ...]) -> bytes:
    event_id, event_type, schema_version, aggregate_type, aggregate_id, version, payload, at, position, _, _ = row
    envelope = EventEnvelope(
        event_id=str(event_id),
        event_type=event_type,
        schema_version=schema_version,
        aggregate_type=aggregate_type,
        aggregate_id=aggregate_id,
        aggregate_version=version,
        position=position,
        payload=payload,
    )
    envelope.occurred_at.FromDatetime(at)
    return envelope.SerializeToString()


async def _wait(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.005)


async def measure(admin_url: str, redis_url: str, events: int, profile: str | None = None) -> dict[str, Any]:
    """Apply `events` live events on one in-process replica; the figures as a dict.

    With `profile`, the apply is run under cProfile and the statistics are written to that file.
    """
    rows = list(mixed_events(events))
    prefix = f"live-{uuid.uuid4().hex[:8]}:"
    async with scratch_database(admin_url) as database_url:
        settings = replica_settings(
            database_url,
            redis_url,
            prefix,
            page_token_secret=SecretStr("measure-live-apply-secret-0123456789"),
            # One replica alone: no applying lease, which a starved loop on a busy machine lets lapse.
            read_apply_mode=ApplyMode.ALWAYS,
        )
        try:
            async with running_read_service(settings) as service:
                projectors = service.projectors
                await _wait(lambda: all(p.ready for p in projectors), 30, "the replica did not become ready")
                conn = await asyncpg.connect(database_url, timeout=10)
                try:
                    await copy_positioned(conn, rows)
                    await conn.execute("UPDATE relay_state SET last_position = $1", events)
                finally:
                    await conn.close()
                payloads = [_envelope(row) for row in rows]
                catch_ups = sum(p.status().catch_ups for p in projectors)
                # Another process publishes while this one's loop is held (a blocking wait on
                # purpose): the whole stream then waits in the replica's socket and Redis's output
                # buffer, as after a write burst, and the clock starts once it is all published.
                with tempfile.NamedTemporaryFile(suffix=".bin") as spool:
                    for payload in payloads:
                        spool.write(len(payload).to_bytes(4, "big") + payload)
                    spool.flush()
                    began = time.monotonic()
                    command = [sys.executable, "-m", "perf.live_apply", "--publish", spool.name]
                    command += ["--redis-url", redis_url, "--channel", events_channel(prefix)]
                    subprocess.run(  # noqa: ASYNC221 - blocking the loop is the point, see above
                        command,
                        check=True,
                        timeout=120,
                    )
                    published = time.monotonic() - began
                profiler = cProfile.Profile() if profile else None
                started = time.monotonic()
                cpu_started = time.process_time()
                if profiler is not None:
                    profiler.enable()
                await _wait(lambda: all(p.checkpoint >= events for p in projectors), 120, "the replica fell behind")
                elapsed = time.monotonic() - started
                cpu = time.process_time() - cpu_started
                if profiler is not None and profile:
                    profiler.disable()
                    profiler.dump_stats(profile)
                extra_catch_ups = sum(p.status().catch_ups for p in projectors) - catch_ups
        finally:
            await clear_prefix(redis_url, prefix)
    return {
        "events": events,
        "published_s": round(published, 3),
        "applied_s": round(elapsed, 3),
        "events_per_s": round(events / elapsed),
        # The replica's own CPU time (this process): on a busy machine the steadier figure.
        "replica_cpu_s": round(cpu, 3),
        "events_per_replica_cpu_s": round(events / cpu),
        "catch_ups_during_run": extra_catch_ups,
    }


async def publish(spool: str, redis_url: str, channel: str) -> None:
    """PUBLISH the envelopes in `spool` (each after its 4-byte length) in pipelines of 500."""
    with open(spool, "rb") as source:  # noqa: ASYNC230 - a local file, read once before timing matters
        data = source.read()
    payloads = []
    offset = 0
    while offset < len(data):
        size = int.from_bytes(data[offset : offset + 4], "big")
        payloads.append(data[offset + 4 : offset + 4 + size])
        offset += 4 + size
    client = aioredis.Redis.from_url(redis_url, socket_timeout=30)
    try:
        for start in range(0, len(payloads), 500):
            async with client.pipeline(transaction=False) as pipe:
                for payload in payloads[start : start + 500]:
                    pipe.publish(channel, payload)
                await pipe.execute()
    finally:
        await client.aclose()


def main(argv: list[str] | None = None) -> int:
    """Run one measurement and print its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--events", type=int, default=9000)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--profile", metavar="FILE", help="write cProfile statistics of the apply to FILE")
    parser.add_argument("--publish", help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    parser.add_argument("--channel", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.publish:
        asyncio.run(publish(args.publish, args.redis_url, args.channel))
        return 0
    with backing() as servers:
        result = asyncio.run(measure(servers.admin_url, servers.redis_url, args.events, args.profile))
    print(json.dumps(result, indent=2))
    if args.json is not None:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
