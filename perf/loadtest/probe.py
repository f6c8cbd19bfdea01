"""Single checked calls: waiting until seeded items are visible on a replica, and pre-flight checks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import grpc

from perf.loadtest.requests import LIST_PAGE_SIZE, bearer_token
from tessera_client import TesseraClient, TesseraError

# How long one waiting query lets the replica wait for a consistency token.
MAX_WAIT_MS = 5000
# Codes that mean "not there yet" while a replica catches up.
NOT_YET = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class NotVisible(RuntimeError):
    """An item did not become visible in time."""


def replica_client(replica: str, metadata: Sequence[tuple[str, str]], write: str | None = None) -> TesseraClient:
    """A client whose read channel goes to one replica only (no session: the caller passes each token).

    `write` is the write service's address when the caller also sends commands; a client that
    only queries never opens its write channel, so the replica's address stands in for it.
    """
    return TesseraClient(write or replica, [replica], token=bearer_token(metadata), session=False)


async def _query(client: TesseraClient, kind: str, key: str, token: str, timeout_s: float) -> Any:
    if kind == "get_user":
        return await client.users.get_user(
            user_id=key, consistency_token=token, max_wait_ms=MAX_WAIT_MS, timeout=timeout_s, consistent=False
        )
    if kind == "get_product":
        return await client.catalog.get_product(
            product_id=key, consistency_token=token, max_wait_ms=MAX_WAIT_MS, timeout=timeout_s, consistent=False
        )
    if kind == "get_order":
        return await client.orders.get_order(
            order_id=key, consistency_token=token, max_wait_ms=MAX_WAIT_MS, timeout=timeout_s, consistent=False
        )
    if kind == "list_orders_by_customer":
        return await client.orders.list_orders_by_customer(
            customer_id=key,
            page_size=LIST_PAGE_SIZE,
            consistency_token=token,
            max_wait_ms=MAX_WAIT_MS,
            timeout=timeout_s,
            consistent=False,
        )
    raise ValueError(f"unknown query kind {kind!r}")


async def call_until_fresh(client: TesseraClient, kind: str, key: str, token: str, deadline: float) -> float:
    """Query `key` with `token` until the answer reflects it; perf_counter time of that answer.

    Raises NotVisible at `deadline` (perf_counter) and the call's TesseraError for codes other
    than NOT_FOUND, UNAVAILABLE and DEADLINE_EXCEEDED.
    """
    while True:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            raise NotVisible(f"{kind} {key} was not visible in time")
        try:
            reply = await _query(client, kind, key, token, max(0.05, min(remaining, MAX_WAIT_MS / 1000 + 2.0)))
        except TesseraError as error:
            if error.code not in NOT_YET:
                raise
            await asyncio.sleep(0.01)  # a NOT_FOUND answer comes at once: do not spin
            continue
        if not reply.stale:
            return time.perf_counter()


async def wait_for_seed(
    targets: Sequence[str], probes: Sequence[tuple[str, str, str]], metadata: Sequence[tuple[str, str]], within_s: float
) -> list[str]:
    """Wait until every probe (kind, id, token) is visible on every target that accepts a connection.

    Returns the targets that could not be connected to (the run then counts their errors);
    raises NotVisible when a connected target does not show a probe within `within_s`.
    """
    from perf.loadtest.worker import CONNECT_TIMEOUT_S, connect

    deadline = time.perf_counter() + within_s
    unreachable = []
    for target in targets:
        async with replica_client(target, metadata) as client:
            if not await connect(client.read_channel, CONNECT_TIMEOUT_S):
                unreachable.append(target)
                continue
            await asyncio.gather(*(call_until_fresh(client, kind, key, token, deadline) for kind, key, token in probes))
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
