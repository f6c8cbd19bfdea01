"""Watch streams and the near cache on real replicas: every version once, in order, across a pause.

Commands and queries go through the client library. The watch streams stay on raw generated
stubs on purpose: these tests check what a replica itself sends (no gap, no duplicate, the
end of a slow reader's stream), which the client's resuming watch would hide by resuming and
by dropping a message it already delivered.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tessera.orders.v1 import order_query_service_pb2 as order_views
from tessera.users.v1 import user_command_service_pb2 as users
from tessera.users.v1 import user_query_service_pb2 as user_views
from tessera.users.v1 import user_query_service_pb2_grpc as user_views_grpc
from tests.e2e.conftest import FAST_HASHING, e2e_config, running_stack
from tests.e2e.test_order_views import CALL_S, SAGA_ENV, Shop, eventually, opened_shop

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

WATCH_QUEUE_MAX = 20
WATCH_ENV = {
    **FAST_HASHING,
    "NEAR_CACHE_SIZE": "1000",
    "NEAR_CACHE_LOG_INTERVAL_S": "1",
    "WATCH_QUEUE_MAX": str(WATCH_QUEUE_MAX),
}


@pytest.fixture(scope="module")
async def shop(e2e_database: str, redis_server_url: str, e2e_prefix: str, e2e_logs: Path) -> AsyncIterator[Shop]:
    """Two replicas sharing one Redis, with the near cache on and small watch queues."""
    config = e2e_config(
        e2e_database, redis_server_url, e2e_prefix, e2e_logs, env=WATCH_ENV, saga_env=SAGA_ENV, relays=1
    )
    async with running_stack(config, redis_server_url) as stack, opened_shop(stack, e2e_database) as opened:
        yield opened


async def update(shop: Shop, user_id: str, n: int, bio: str = "") -> users.UpdateUserProfileResponse:
    reply: users.UpdateUserProfileResponse = await shop.tessera.users.update_user_profile(
        users.UpdateUserProfileRequest(user_id=user_id, full_name=f"Name {n}", bio=bio), timeout=CALL_S
    )
    return reply


async def messages(call: Any) -> AsyncIterator[Any]:
    """A stream's messages through read() (grpc does not allow read() and iteration on one call)."""
    while True:
        message = await call.read()
        if message is grpc.aio.EOF:
            return
        yield message


async def versions_until(call: Any, last: int, into: list[tuple[int, int]]) -> None:
    """Read a WatchUser/WatchOrder stream into (version, view_position) until version `last`."""
    async for message in messages(call):
        into.append((message.version, message.view_position))
        if message.version >= last:
            call.cancel()
            return


def assert_consecutive(seen: list[tuple[int, int]], first: int, last: int) -> None:
    assert [v for v, _ in seen] == list(range(first, last + 1)), seen
    positions = [p for _, p in seen]
    assert positions == sorted(set(positions)), seen


def assert_every_version(seen: list[tuple[int, int]], first: int, last: int) -> None:
    """Every version in order (an order's view may also change without a new version), no position twice."""
    versions = [v for v, _ in seen]
    assert versions == sorted(versions), seen
    assert sorted(set(versions)) == list(range(first, last + 1)), seen
    positions = [p for _, p in seen]
    assert positions == sorted(set(positions)), seen


async def test_watch_user_on_both_replicas_sees_every_version_in_order(shop: Shop) -> None:
    user_id = await shop.customer("Watched Person")
    calls = [shop.raw_users(i).WatchUser(user_views.WatchUserRequest(user_id=user_id), timeout=60) for i in (0, 1)]
    firsts = [await call.read() for call in calls]
    seen: list[list[tuple[int, int]]] = [[], []]
    for first, into in zip(firsts, seen, strict=True):
        assert first.exists or first.version == 0
        if first.exists:
            into.append((first.version, first.view_position))
    start = min(first.version for first in firsts)
    last = 25
    readers = [asyncio.create_task(versions_until(call, last, into)) for call, into in zip(calls, seen, strict=True)]
    # Commands run concurrently (no expected_version): versions 2..25.
    await asyncio.gather(*(update(shop, user_id, n) for n in range(2, last + 1)))
    await asyncio.wait_for(asyncio.gather(*readers), 30)
    for into in seen:
        assert_consecutive(into, into[0][0], last)
        assert into[0][0] <= max(start, 1)
    # Both replicas announce each version at the same event log position.
    common = {v for v, _ in seen[0]} & {v for v, _ in seen[1]}
    assert dict(seen[0]).keys() >= common
    assert {v: p for v, p in seen[0] if v in common} == {v: p for v, p in seen[1] if v in common}


async def test_watch_across_a_paused_replica_has_no_gap_and_no_duplicate(shop: Shop) -> None:
    user_id = await shop.customer("Paused Watcher")
    replica = shop.stack.readers[1]
    call = shop.raw_users(1).WatchUser(user_views.WatchUserRequest(user_id=user_id), timeout=90)
    first = await call.read()
    seen = [(first.version, first.view_position)] if first.exists else []
    # Fewer changes than WATCH_QUEUE_MAX: they all arrive at once after SIGCONT.
    last = 16
    replica.pause()
    try:
        # The other replica applies these while this one is stopped: after SIGCONT, its
        # projector finds them applied already and its feed replays them from the log.
        for n in range(2, last + 1):
            await update(shop, user_id, n)
    finally:
        replica.resume()
    await asyncio.wait_for(versions_until(call, last, seen), 60)
    assert_consecutive(seen, seen[0][0], last)
    assert seen[0][0] == 1


async def test_watch_order_and_orders_by_customer_follow_the_saga(shop: Shop) -> None:
    customer = await shop.customer("Order Watcher")
    _, sku = await shop.product("Watched widget", stock=50, price_minor=1200)
    by_customer = shop.raw_orders(0).WatchOrdersByCustomer(
        order_views.WatchOrdersByCustomerRequest(customer_id=customer), timeout=90
    )
    initial = await by_customer.read()
    assert initial.initial and list(initial.orders) == []
    placed = await shop.place(customer, (sku, 2))
    order_id = placed.order_id
    watch = shop.raw_orders(1).WatchOrder(order_views.WatchOrderRequest(order_id=order_id), timeout=90)
    first = await watch.read()
    await shop.saga_done(order_id)
    last_version = int(
        await shop.pool.fetchval(
            "SELECT max(aggregate_version) FROM outbox WHERE aggregate_type = 'order' AND aggregate_id = $1", order_id
        )
    )
    seen_order: list[tuple[int, int]] = []
    if first.exists:
        seen_order.append((first.version, first.view_position))
    if not seen_order or seen_order[-1][0] < last_version:
        await asyncio.wait_for(versions_until(watch, last_version, seen_order), 30)
    else:
        watch.cancel()
    assert_every_version(seen_order, seen_order[0][0], last_version)

    customer_seen: list[tuple[int, int]] = []
    async for message in messages(by_customer):
        assert not message.initial
        (order,) = message.orders
        assert order.order_id == order_id
        customer_seen.append((order.version, message.view_position))
        if order.version >= last_version:
            by_customer.cancel()
            break
    assert_every_version(customer_seen, 1, last_version)
    assert last_version > 1


async def slow_watch(shop: Shop) -> tuple[grpc.aio.AioRpcError, int]:
    """Open a watch, make 400 changes without reading it, then read: the error it ends with, and how many came."""
    user_id = await shop.customer("Slow Reader")
    # Without bandwidth probing the client's HTTP/2 window stays small, so an unread stream
    # backs up into the server's watch queue after a few dozen messages (with it, the
    # transport may buffer megabytes before the server notices anything). A subchannel pool of
    # its own keeps it from sharing a connection made with other options.
    options = [("grpc.http2.bdp_probe", 0), ("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(shop.stack.read_addresses[0], options=options) as channel:
        call = user_views_grpc.UserQueryServiceStub(channel).WatchUser(
            user_views.WatchUserRequest(user_id=user_id), timeout=60
        )
        await call.read()
        bio = "slow " * 399  # about 2 kB per message
        for start in range(2, 402, 20):
            await asyncio.gather(*(update(shop, user_id, n, bio) for n in range(start, start + 20)))
        # Now read: whatever the transport buffered comes first, then the end.
        received = 0
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            async for _ in messages(call):
                received += 1
    return failure.value, received


async def test_a_watcher_that_never_reads_is_ended_with_resource_exhausted(shop: Shop) -> None:
    for _ in range(3):
        error, received = await slow_watch(shop)
        # A replica that stopped serving meanwhile ends every watch with UNAVAILABLE instead
        # (its projector may briefly report a lost key space under a burst); try again then.
        if error.code() != grpc.StatusCode.UNAVAILABLE:
            break
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (error, received)
    assert "WATCH_QUEUE_MAX" in (error.details() or "")
    assert received < 400


async def test_watch_requests_with_bad_ids_are_invalid_argument(shop: Shop) -> None:
    for call in (
        shop.raw_users(0).WatchUser(user_views.WatchUserRequest(user_id="nope"), timeout=10),
        shop.raw_orders(0).WatchOrder(order_views.WatchOrderRequest(order_id=""), timeout=10),
        shop.raw_orders(0).WatchOrdersByCustomer(order_views.WatchOrdersByCustomerRequest(customer_id="1"), timeout=10),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call.read()
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_near_cache_reads_after_writes_are_never_old_and_the_hit_ratio_is_logged(shop: Shop) -> None:
    user_id = await shop.customer("Cached Person")
    for n in range(2, 22):
        reply = await update(shop, user_id, n)
        replica = n % 2
        for _ in range(3):
            got = await shop.users(replica).get_user(
                user_views.GetUserRequest(user_id=user_id, consistency_token=reply.consistency_token), timeout=10
            )
            assert not got.stale
            assert got.user.version >= reply.version
            assert got.user.full_name == f"Name {n}" or got.user.version > reply.version
    # Hot reads: they come from memory now, once the feed has released the last write (queries
    # with a consistency token, above, always read Redis).
    for _ in range(50):
        got = await shop.users(0).get_user(user_views.GetUserRequest(user_id=user_id), timeout=10)
        assert got.user.version == 21

    log = shop.stack.readers[0].log_path
    pattern = re.compile(r"near cache users: hit ratio ([0-9.]+) \((\d+) hits")

    async def ratio() -> float | None:
        found = pattern.findall(log.read_text(errors="replace"))
        if not found:
            return None
        value, hits = found[-1]
        return float(value) if int(hits) >= 40 else None

    started = time.monotonic()
    value = await eventually(ratio, 15, "no near cache hit ratio in the replica's log")
    assert 0 < value <= 1, (value, time.monotonic() - started)
