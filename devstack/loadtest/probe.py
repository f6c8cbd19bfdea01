"""Single checked calls: waiting until seeded items are visible on a replica, and pre-flight checks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import grpc

from devstack.loadtest.requests import READ_METHODS, query_body
from tessera.catalog.v1 import product_query_service_pb2 as product_queries
from tessera.orders.v1 import order_query_service_pb2 as order_queries
from tessera.users.v1 import user_query_service_pb2 as user_queries

# The reply type of each query kind, to read its `stale` flag.
REPLIES: dict[str, Any] = {
    "get_user": user_queries.GetUserResponse,
    "get_product": product_queries.GetProductResponse,
    "get_order": order_queries.GetOrderResponse,
    "list_orders_by_customer": order_queries.ListOrdersByCustomerResponse,
}
# How long one waiting query lets the replica wait for a consistency token.
MAX_WAIT_MS = 5000
# Codes that mean "not there yet" while a replica catches up.
NOT_YET = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class NotVisible(RuntimeError):
    """An item did not become visible in time."""


def is_stale(kind: str, reply: bytes) -> bool:
    """Whether a query reply says it answered before reflecting its consistency token."""
    return bool(REPLIES[kind].FromString(reply).stale)


async def call_until_fresh(  # noqa: PLR0917 - one query's parts, all needed
    channel: grpc.aio.Channel,
    kind: str,
    key: str,
    token: str,
    metadata: Sequence[tuple[str, str]],
    deadline: float,
) -> float:
    """Query `key` with `token` until the answer reflects it; perf_counter time of that answer.

    Raises NotVisible at `deadline` (perf_counter) and the call's error for codes other than
    NOT_FOUND, UNAVAILABLE and DEADLINE_EXCEEDED.
    """
    method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(READ_METHODS[kind])
    body = query_body(kind, key, consistency_token=token, max_wait_ms=MAX_WAIT_MS)
    while True:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            raise NotVisible(f"{kind} {key} was not visible in time")
        try:
            reply = await method(body, timeout=max(0.05, min(remaining, MAX_WAIT_MS / 1000 + 2.0)), metadata=metadata)
        except grpc.aio.AioRpcError as error:
            if error.code() not in NOT_YET:
                raise
            await asyncio.sleep(0.01)  # a NOT_FOUND answer comes at once: do not spin
            continue
        if not is_stale(kind, reply):
            return time.perf_counter()


async def wait_for_seed(
    targets: Sequence[str], probes: Sequence[tuple[str, str, str]], metadata: Sequence[tuple[str, str]], within_s: float
) -> list[str]:
    """Wait until every probe (kind, id, token) is visible on every target that accepts a connection.

    Returns the targets that could not be connected to (the run then counts their errors);
    raises NotVisible when a connected target does not show a probe within `within_s`.
    """
    from devstack.loadtest.worker import CONNECT_TIMEOUT_S, connect

    deadline = time.perf_counter() + within_s
    unreachable = []
    for target in targets:
        async with grpc.aio.insecure_channel(target) as channel:
            if not await connect(channel, CONNECT_TIMEOUT_S):
                unreachable.append(target)
                continue
            await asyncio.gather(
                *(call_until_fresh(channel, kind, key, token, metadata, deadline) for kind, key, token in probes)
            )
    return unreachable


async def preflight(
    target: str, method: str, body: bytes, metadata: Sequence[tuple[str, str]], timeout_s: float = 10.0
) -> tuple[str, int, str]:
    """One call of exactly `body`: (status code name, reply length, details)."""
    async with grpc.aio.insecure_channel(target) as channel:
        call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
        try:
            reply = await call(body, timeout=timeout_s, metadata=tuple(metadata))
        except grpc.aio.AioRpcError as error:
            return error.code().name, 0, str(error.details())
    return "OK", len(reply), ""
