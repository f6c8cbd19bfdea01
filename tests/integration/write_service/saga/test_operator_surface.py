"""OrderSagaAdminService in the real write service process, and the `write_service.saga.admin` command."""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import uuid
from typing import Any

import asyncpg
import grpc
import pytest

from shared_kernel.platform.security.tokens import TokenSigner
from tessera.orders.v1 import saga_admin_service_pb2 as pb
from tessera.orders.v1 import saga_admin_service_pb2_grpc as pb_grpc
from tests.integration.write_service.saga.support import add_product, add_user, place_order
from tests.integration.write_service.support import ROOT, environment, running_write_service

pytestmark = pytest.mark.integration

_PARK = """
UPDATE saga_executions SET status = 'failed', current_step = 'authorize_payment', attempts = 3,
    last_error = 'authorize_payment: payment provider answered UNAVAILABLE', next_attempt_at = NULL,
    version = version + 1
WHERE order_id = $1
"""
_STEP = """
INSERT INTO saga_steps (saga_id, step, kind, outcome, detail, attempt, at)
SELECT id, 'authorize_payment', 'act', 'failed', 'UNAVAILABLE', 3, now() FROM saga_executions WHERE order_id = $1
"""


async def _orders(pool: asyncpg.Pool[Any], count: int) -> list[uuid.UUID]:
    customer = await add_user(pool)
    product, _ = await add_product(pool, 100)
    return [await place_order(pool, customer, [(product, 1)]) for _ in range(count)]


async def test_list_get_and_retry_over_grpc(db_pool: asyncpg.Pool[Any], database_url: str) -> None:
    first, second, parked = await _orders(db_pool, 3)
    await db_pool.execute(_PARK, parked)
    await db_pool.execute(_STEP, parked)
    async with running_write_service(database_url) as service:
        stub = pb_grpc.OrderSagaAdminServiceStub(service.channel)

        failed = await stub.ListSagas(pb.ListSagasRequest(status=pb.SAGA_STATUS_FAILED), timeout=5)
        assert [s.order_id for s in failed.sagas] == [str(parked)]
        assert failed.sagas[0].last_error.endswith("UNAVAILABLE")

        seen: list[str] = []
        token = ""
        while True:
            page = await stub.ListSagas(pb.ListSagasRequest(page_size=1, page_token=token), timeout=5)
            seen += [s.order_id for s in page.sagas]
            token = page.next_page_token
            if not token:
                break
        assert seen == [str(parked), str(second), str(first)]  # newest first

        shown = await stub.GetSaga(pb.GetSagaRequest(id=str(parked)), timeout=5)
        assert shown.saga.status == pb.SAGA_STATUS_FAILED
        assert [(s.step, s.outcome, s.attempt) for s in shown.saga.steps] == [("authorize_payment", "failed", 3)]

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.RetrySaga(pb.RetrySagaRequest(id=str(first)), timeout=5)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "only a failed saga can be retried" in (refused.value.details() or "")

        retried = await stub.RetrySaga(pb.RetrySagaRequest(id=shown.saga.saga_id), timeout=5)
        assert (retried.saga.status, retried.saga.attempts, retried.saga.last_error) == (
            pb.SAGA_STATUS_RUNNING,
            0,
            "",
        )
        assert retried.saga.steps[-1].outcome == "retrying"
        assert retried.saga.HasField("next_attempt_at")

        for call, request, code in [
            (stub.GetSaga, pb.GetSagaRequest(id="not-a-uuid"), grpc.StatusCode.INVALID_ARGUMENT),
            (stub.GetSaga, pb.GetSagaRequest(id=str(uuid.uuid4())), grpc.StatusCode.NOT_FOUND),
            (stub.RetrySaga, pb.RetrySagaRequest(id=str(uuid.uuid4())), grpc.StatusCode.NOT_FOUND),
            (stub.ListSagas, pb.ListSagasRequest(page_size=101), grpc.StatusCode.INVALID_ARGUMENT),
            (stub.ListSagas, pb.ListSagasRequest(page_token="garbage!"), grpc.StatusCode.INVALID_ARGUMENT),
            (stub.ListSagas, pb.ListSagasRequest(status=42), grpc.StatusCode.INVALID_ARGUMENT),  # type: ignore[arg-type]
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await call(request, timeout=5)  # type: ignore[operator]
            assert failure.value.code() == code, request


async def _cli(database_url: str, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "write_service.saga.admin",
        *args,
        cwd=ROOT,
        env=environment(DATABASE_URL=database_url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_cli_lists_shows_and_retries(db_pool: asyncpg.Pool[Any], database_url: str) -> None:
    running, parked = await _orders(db_pool, 2)
    await db_pool.execute(_PARK, parked)
    code, out, _ = await _cli(database_url, "list", "--status", "failed", "--json")
    assert code == 0
    assert [json.loads(line)["order_id"] for line in out.splitlines()] == [str(parked)]
    code, out, _ = await _cli(database_url, "show", str(parked))
    assert code == 0
    assert "failed" in out
    assert "UNAVAILABLE" in out
    assert (await _cli(database_url, "retry", str(running)))[0] == 4
    assert (await _cli(database_url, "show", str(uuid.uuid4())))[0] == 3
    assert (await _cli(database_url, "show", "nope"))[0] == 2
    code, out, _ = await _cli(database_url, "retry", str(parked))
    assert code == 0
    assert "running" in out
    status = await db_pool.fetchval("SELECT status FROM saga_executions WHERE order_id = $1", parked)
    assert status == "running"


async def test_the_admin_service_needs_the_admin_scope(db_pool: asyncpg.Pool[Any], database_url: str) -> None:
    (parked,) = await _orders(db_pool, 1)
    await db_pool.execute(_PARK, parked)
    key = secrets.token_hex(32)
    signer = TokenSigner(key.encode())
    async with running_write_service(database_url, AUTH_MODE="required", AUTH_SIGNING_KEY=key) as service:
        stub = pb_grpc.OrderSagaAdminServiceStub(service.channel)
        writer = [("authorization", f"Bearer {signer.mint('orders-client', ['orders:write'], 60)}")]
        operator = [("authorization", f"Bearer {signer.mint('ops-alice', ['admin'], 60)}")]
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.RetrySaga(pb.RetrySagaRequest(id=str(parked)), metadata=writer, timeout=5)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await stub.ListSagas(pb.ListSagasRequest(), timeout=5)
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        retried = await stub.RetrySaga(pb.RetrySagaRequest(id=str(parked)), metadata=operator, timeout=5)
        assert retried.saga.steps[-1].detail.startswith("retried by ops-alice")
