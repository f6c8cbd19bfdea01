"""tessera.orders.v1.OrderSagaAdminService: list, inspect and retry order sagas (scope `admin`).

Served by the write service process. Errors are raised as the project's exception types
and mapped to status codes by the shared interceptor.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import grpc

from shared_kernel.contracts import errors
from shared_kernel.platform.security.authn import current_principal
from tessera.orders.v1 import saga_admin_service_pb2 as pb
from tessera.orders.v1 import saga_admin_service_pb2_grpc as pb_grpc
from write_service.saga import model
from write_service.saga.operations import SagaRecord, get_saga, list_sagas, parse_id, retry_saga

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["OrderSagaAdminService"].full_name

STATUS_TO_PB = {
    model.RUNNING: pb.SAGA_STATUS_RUNNING,
    model.COMPENSATING: pb.SAGA_STATUS_COMPENSATING,
    model.COMPLETED: pb.SAGA_STATUS_COMPLETED,
    model.FAILED: pb.SAGA_STATUS_FAILED,
}
PB_TO_STATUS = {value: key for key, value in STATUS_TO_PB.items()}


def saga_to_pb(record: SagaRecord) -> pb.SagaExecution:
    """The wire form of a saga record."""
    message = pb.SagaExecution(
        saga_id=str(record.id),
        order_id=str(record.order_id),
        status=STATUS_TO_PB.get(record.status, pb.SAGA_STATUS_UNSPECIFIED),
        current_step=record.current_step,
        attempts=record.attempts,
        last_error=record.last_error,
        version=record.version,
    )
    message.created_at.FromDatetime(record.created_at)
    message.updated_at.FromDatetime(record.updated_at)
    if record.next_attempt_at is not None and record.status in model.ACTIVE_STATUSES:
        message.next_attempt_at.FromDatetime(record.next_attempt_at)
    for step in record.steps:
        entry = message.steps.add(
            step=step.step, kind=step.kind, outcome=step.outcome, detail=step.detail, attempt=step.attempt
        )
        entry.at.FromDatetime(step.at)
    return message


class OrderSagaAdminServicer(pb_grpc.OrderSagaAdminServiceServicer):
    """The operator's view of sagas, read and changed directly in Postgres."""

    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self._pool = pool

    async def ListSagas(
        self, request: pb.ListSagasRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListSagasResponse:
        """A page of sagas, newest first."""
        if request.status != pb.SAGA_STATUS_UNSPECIFIED and request.status not in PB_TO_STATUS:
            raise errors.InvalidArgument.single("status", "is not a SagaStatus value")
        status = PB_TO_STATUS.get(request.status)
        page = await list_sagas(self._pool, status, request.page_size, request.page_token)
        return pb.ListSagasResponse(sagas=[saga_to_pb(s) for s in page.sagas], next_page_token=page.next_page_token)

    async def GetSaga(
        self, request: pb.GetSagaRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetSagaResponse:
        """One saga with its step log."""
        return pb.GetSagaResponse(saga=saga_to_pb(await get_saga(self._pool, parse_id(request.id))))

    async def RetrySaga(
        self, request: pb.RetrySagaRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RetrySagaResponse:
        """Restart a failed saga; any other state is FAILED_PRECONDITION."""
        record = await retry_saga(self._pool, parse_id(request.id), current_principal())
        return pb.RetrySagaResponse(saga=saga_to_pb(record))
