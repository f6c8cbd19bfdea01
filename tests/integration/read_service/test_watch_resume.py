"""Resumed order watches against a real replica: the replay from the log equals what a live watch saw.

The orders scenario of test_order_views (every outcome, with the products' StockReserved
events that change an order's view without a new order version) is written in two parts:
the users and products first, the orders while live watches are open. A watch resumed after
any position a live watch delivered must then send exactly the live watch's later messages;
the same for the customer's user view, which the orders change (its order figures).
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from read_service.bootstrap import running_read_service
from tessera.orders.v1 import order_query_service_pb2 as opb
from tessera.orders.v1.order_query_service_pb2_grpc import OrderQueryServiceStub
from tessera.users.v1 import user_query_service_pb2 as upb
from tessera.users.v1.user_query_service_pb2_grpc import UserQueryServiceStub

from .conftest import EventLog, Publisher, eventually
from .test_order_views import World
from .test_service import settings_for

pytestmark = pytest.mark.integration


async def read(call: Any, count: int) -> list[Any]:
    return [await asyncio.wait_for(call.read(), 10) for _ in range(count)]


def wire(messages: list[Any]) -> list[bytes]:
    return [m.SerializeToString(deterministic=True) for m in messages]


async def test_resumed_order_watches_send_what_a_live_watch_sent_after_that_position(
    database_url: str, redis_server_url: str, redis_prefix: str, event_log: EventLog, publisher: Publisher
) -> None:
    world = World()
    world.build()
    order_id, customer_id = world.ids["o1"], world.ids["ada"]
    first_order = next(i for i, e in enumerate(world.log) if e.aggregate_type == "order")
    await event_log.append(*world.log[:first_order])
    settings = settings_for(database_url, redis_server_url, redis_prefix)
    async with running_read_service(settings) as service:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
        try:
            stub = OrderQueryServiceStub(channel)
            users = UserQueryServiceStub(channel)
            head = await event_log.head()
            await eventually(lambda: all(p.ready and p.checkpoint == head for p in service.projectors))
            order_call = stub.WatchOrder(opb.WatchOrderRequest(order_id=order_id), timeout=60)
            customer_call = stub.WatchOrdersByCustomer(
                opb.WatchOrdersByCustomerRequest(customer_id=customer_id), timeout=60
            )
            user_call = users.WatchUser(upb.WatchUserRequest(user_id=customer_id), timeout=60)
            (absent,) = await read(order_call, 1)
            (user_now,) = await read(user_call, 1)
            (initial,) = await read(customer_call, 1)
            assert not absent.exists and initial.initial and not initial.orders

            for envelope in await event_log.append(*world.log[first_order:]):
                await publisher.event(envelope)
            head = await event_log.head()
            await eventually(lambda: all(p.checkpoint == head for p in service.projectors))
            final = (await stub.GetOrder(opb.GetOrderRequest(order_id=order_id), timeout=10)).order
            live = [absent]
            while live[-1].order != final:
                live += await read(order_call, 1)
            ada_orders = {world.ids[n] for n in ("o1", "o2", "o4", "o7")}
            finals = {
                o: (await stub.GetOrder(opb.GetOrderRequest(order_id=o), timeout=10)).order.SerializeToString(
                    deterministic=True
                )
                for o in ada_orders
            }
            customer_live = [initial]
            latest: dict[str, bytes] = {}
            while latest != finals:
                (message,) = await read(customer_call, 1)
                customer_live.append(message)
                for view in message.orders:
                    latest[view.order_id] = view.SerializeToString(deterministic=True)
            final_user = (await users.GetUser(upb.GetUserRequest(user_id=customer_id), timeout=10)).user
            user_live = [user_now]
            # (GetUser adds the spent totals, kept beside the view; the watch sends the view.)
            while user_live[-1].user.order_count != final_user.order_count:
                user_live += await read(user_call, 1)
            order_call.cancel()
            customer_call.cancel()
            user_call.cancel()

            # The customer's view changed with each order placed (order_count), without a new user version.
            assert len(user_live) > 1 and {m.version for m in user_live} == {user_now.version}
            for k, message in enumerate(user_live):
                user_resumed = users.WatchUser(
                    upb.WatchUserRequest(user_id=customer_id, after_position=message.view_position), timeout=30
                )
                assert wire(await read(user_resumed, len(user_live) - k - 1)) == wire(user_live[k + 1 :]), k
                user_resumed.cancel()

            # The order changed at more positions than it has versions (StockReserved of products).
            assert len(live) - 1 > final.version
            for k, message in enumerate(live):
                resumed = stub.WatchOrder(
                    opb.WatchOrderRequest(order_id=order_id, after_position=message.view_position), timeout=30
                )
                assert wire(await read(resumed, len(live) - k - 1)) == wire(live[k + 1 :]), k
                resumed.cancel()
            # After a position older than the order: its whole history.
            resumed = stub.WatchOrder(opb.WatchOrderRequest(order_id=order_id, after_position=0), timeout=30)
            assert wire(await read(resumed, len(live) - 1)) == wire(live[1:])
            resumed.cancel()

            for k in (0, 1, len(customer_live) // 2, len(customer_live) - 2):
                after = customer_live[k].view_position
                by_customer = stub.WatchOrdersByCustomer(
                    opb.WatchOrdersByCustomerRequest(customer_id=customer_id, after_position=after), timeout=30
                )
                assert wire(await read(by_customer, len(customer_live) - k - 1)) == wire(customer_live[k + 1 :]), k
                by_customer.cancel()
        finally:
            await channel.close()
