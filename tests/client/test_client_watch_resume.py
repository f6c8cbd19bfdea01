"""Watches that resume across killed replicas deliver every version once: no gap, no duplicate.

Real processes (tests/e2e/conftest.py): the replica serving a watch is killed with SIGKILL
while the watched aggregate keeps changing, before, during and after the reconnect, so
versions change while no replica serves the stream. The client resumes after the last
position it delivered (`after_position`), and the new replica replays what the stream missed
from the event log.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from devstack.supervisor import ServiceProcess, Stack
from tessera.common.v1.money_pb2 import Money
from tessera.orders.v1.order_pb2 import OrderStatus
from tessera_client import TesseraClient

pytestmark = pytest.mark.e2e


async def restart(process: ServiceProcess) -> None:
    await asyncio.to_thread(process.start)
    await process.wait_healthy_async(60.0)


class Delivered:
    """The messages a watch delivered, with a wait for the n-th version."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self._arrived = asyncio.Condition()

    async def follow(self, stream: AsyncIterator[Any]) -> None:
        async for message in stream:
            async with self._arrived:
                self.messages.append(message)
                self._arrived.notify_all()

    async def until(self, done: Callable[[list[Any]], bool], timeout: float = 60.0) -> None:
        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: done(self.messages)), timeout)


async def churn_while_killing(stack: Stack, change: Callable[[], Awaitable[None]], per_phase: int) -> None:
    """Kill every replica one after the other, changing the aggregate before, between and after.

    The serving replica certainly dies; once the last one is down, the changes happen while
    the stream is reconnecting, so the replica it resumes on must replay them.
    """
    readers = list(stack.readers)
    for _ in range(per_phase):
        await change()
    for replica in readers:
        await asyncio.to_thread(replica.kill)
        for _ in range(per_phase):
            await change()
    for replica in readers:
        await restart(replica)
        for _ in range(per_phase):
            await change()


async def test_a_user_watch_sees_every_version_once_across_killed_replicas(
    client: TesseraClient, stack: Stack, unique: str
) -> None:
    reply = await client.users.register_user(
        email=f"rw{unique}@example.com", username=f"rw{unique}", password="correct horse battery", full_name="V1"
    )
    delivered = Delivered()
    watcher = asyncio.create_task(delivered.follow(client.users.watch_user(user_id=reply.user_id)))
    version = 1

    async def update() -> None:
        nonlocal version
        version += 1
        await client.users.update_user_profile(user_id=reply.user_id, full_name=f"V{version}", bio="", avatar_url="")

    try:
        await delivered.until(lambda got: any(m.exists for m in got))
        await churn_while_killing(stack, update, per_phase=3)
        await delivered.until(lambda got: got[-1].version >= version)
        got = [m for m in delivered.messages if m.exists]  # a first "not yet" is allowed
        assert [m.version for m in got] == list(range(1, version + 1))
        assert [m.user.full_name for m in got] == [f"V{n}" for n in range(1, version + 1)]
        positions = [m.view_position for m in delivered.messages]
        assert positions == sorted(set(positions))
        assert client.watch_resumes >= len(stack.readers) - 1
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


SETTLED = {OrderStatus.ORDER_STATUS_CONFIRMED, OrderStatus.ORDER_STATUS_CANCELLED, OrderStatus.ORDER_STATUS_REJECTED}


async def test_a_customer_orders_watch_sees_every_order_change_once_across_killed_replicas(
    client: TesseraClient, stack: Stack, unique: str
) -> None:
    """Orders placed while replicas die; each order's saga moves it on meanwhile."""
    customer = await client.users.register_user(
        email=f"rc{unique}@example.com", username=f"rc{unique}", password="correct horse battery", full_name="Buyer"
    )
    sku = f"RC-{unique}".upper()
    await client.catalog.add_product(
        sku=sku, name="Resumed", price=Money(currency_code="EUR", amount_minor=100), initial_stock=1000
    )
    await client.users.get_user(user_id=customer.user_id)  # the customer is visible to the saga's reads
    delivered = Delivered()
    watcher = asyncio.create_task(
        delivered.follow(client.orders.watch_orders_by_customer(customer_id=customer.user_id))
    )
    placed: list[str] = []

    async def place() -> None:
        reply = await client.orders.place_order(
            customer_id=customer.user_id,
            items=[{"sku": sku, "quantity": 1}],
            shipping_address={
                "recipient": "Resume Test",
                "line1": "1 Main St",
                "city": "Springfield",
                "postal_code": "12345",
                "country_code": "US",
            },
        )
        placed.append(reply.order_id)

    try:
        await delivered.until(bool)
        await churn_while_killing(stack, place, per_phase=1)
        finals: dict[str, bytes] = {}
        deadline = time.monotonic() + 60
        while len(finals) < len(placed):
            assert time.monotonic() < deadline, "the orders' sagas did not settle"
            for order_id in placed:
                order = (await client.orders.get_order(order_id=order_id)).order
                if order.status in SETTLED:
                    finals[order_id] = order.SerializeToString(deterministic=True)
            await asyncio.sleep(0.1)

        def latest(got: list[Any]) -> dict[str, bytes]:
            return {o.order_id: o.SerializeToString(deterministic=True) for m in got for o in m.orders}

        await delivered.until(lambda got: latest(got) == finals)
        positions = [m.view_position for m in delivered.messages]
        assert positions == sorted(set(positions))
        assert delivered.messages[0].initial and not delivered.messages[0].orders
        for order_id in placed:
            versions = [o.version for m in delivered.messages for o in m.orders if o.order_id == order_id]
            # Every version once at least, in order (a product's StockReserved repeats one).
            assert sorted(set(versions)) == list(range(1, versions[-1] + 1)), (order_id, versions)
            assert versions == sorted(versions), (order_id, versions)
        assert client.watch_resumes >= len(stack.readers) - 1
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
