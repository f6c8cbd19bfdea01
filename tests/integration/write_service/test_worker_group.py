"""`WRITE_WORKERS=2 python -m write_service`: two write services on one port, run by one parent.

What must hold across commands holds across the workers, because Postgres decides it: a SKU
is taken once whichever worker each call reaches, and one idempotency key gets one reply.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from devstack.processes import children, wait_gone
from tessera.catalog.v1 import catalog_command_service_pb2 as pb
from tessera.catalog.v1 import catalog_command_service_pb2_grpc as pb_grpc
from tessera.common.v1.money_pb2 import Money
from tests.integration.write_service.support import running_write_service
from tests.unit.write_service import helpers

if TYPE_CHECKING:
    from tessera.catalog.v1.catalog_command_service_pb2_grpc import CatalogCommandServiceAsyncStub as Stub

pytestmark = pytest.mark.integration

CONNECTIONS = 16


def add(sku: str) -> pb.AddProductRequest:
    return pb.AddProductRequest(
        sku=sku, name="Across workers", price=Money(currency_code="EUR", amount_minor=250), initial_stock=3
    )


async def on_own_connections(address: str, call: Callable[[Stub], Awaitable[Any]]) -> list[Any]:
    """Run `call(stub)` once over each of CONNECTIONS new connections (the kernel spreads them over the workers)."""
    channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(CONNECTIONS)
    ]
    try:
        stubs = [pb_grpc.CatalogCommandServiceStub(channel) for channel in channels]
        return await asyncio.gather(*(call(stub) for stub in stubs), return_exceptions=True)
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))


async def test_two_workers_keep_uniqueness_and_idempotency_exact_and_stop_together(database_url):
    async with running_write_service(database_url, WRITE_WORKERS="2", LOG_FORMAT="json") as service:
        workers = children(service.process.pid)
        assert len(workers) == 2
        address = service.address

        sku = f"GROUP-{helpers.suffix()}".upper()
        outcomes = await on_own_connections(address, lambda stub: stub.AddProduct(add(sku), timeout=10))
        added = [o for o in outcomes if isinstance(o, pb.AddProductResponse)]
        refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert len(added) == 1, outcomes
        assert {e.code() for e in refused} == {grpc.StatusCode.ALREADY_EXISTS}
        assert len(refused) == CONNECTIONS - 1

        key = (("idempotency-key", f"group-{helpers.suffix()}"),)
        keyed_sku = f"KEYED-{helpers.suffix()}".upper()

        async def keyed(stub: Stub) -> pb.AddProductResponse:
            # A call that finds the key held by a running twin is ABORTED: it retries, as a client would.
            deadline = time.monotonic() + 30
            while True:
                try:
                    return await stub.AddProduct(add(keyed_sku), timeout=10, metadata=key)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.ABORTED or time.monotonic() > deadline:
                        raise
                await asyncio.sleep(0.05)

        replies = await on_own_connections(address, keyed)
        failed = [r for r in replies if not isinstance(r, pb.AddProductResponse)]
        assert not failed, failed  # the errors themselves, not a truncated list of replies
        assert len({r.SerializeToString(deterministic=True) for r in replies}) == 1

        returncode, log = await service.terminate()
    assert returncode == 0, log
    assert wait_gone(workers, 5) == []
    assert log.count('"shutting down"') == 2, "each worker drains and stops by itself"
    assert "write worker group stopped" in log
