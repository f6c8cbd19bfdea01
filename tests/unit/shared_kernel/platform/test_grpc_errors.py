"""Domain errors and driver failures mapped to gRPC statuses."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from shared_kernel.contracts import errors
from shared_kernel.platform import grpc_errors
from shared_kernel.platform.grpc_errors import status_for, to_domain_error


def _details(status: grpc.Status) -> status_pb2.Status:
    for key, value in status.trailing_metadata:
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError("no rich status in trailing metadata")


def test_invalid_argument_carries_bad_request_violations() -> None:
    error = errors.InvalidArgument(
        [errors.FieldViolation("email", "not an e-mail address"), errors.FieldViolation("username", "too short")]
    )
    status = status_for(error)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    rich = _details(status)
    bad_request = error_details_pb2.BadRequest()
    assert rich.details[0].Unpack(bad_request)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("email", "not an e-mail address"),
        ("username", "too short"),
    ]


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.NotFound("user x not found"), grpc.StatusCode.NOT_FOUND),
        (errors.AlreadyExists("email taken", field="email"), grpc.StatusCode.ALREADY_EXISTS),
        (errors.FailedPrecondition("already deactivated"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.Conflict("retry"), grpc.StatusCode.ABORTED),
        (errors.Unavailable("db down"), grpc.StatusCode.UNAVAILABLE),
        (errors.ResourceExhausted("slow"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
def test_each_domain_error_has_its_code(error: errors.DomainError, code: grpc.StatusCode) -> None:
    status = status_for(error)
    assert status.code == code
    assert status.details == error.message


def test_driver_errors_are_translated() -> None:
    assert isinstance(to_domain_error(ConnectionRefusedError()), errors.Unavailable)
    assert to_domain_error(ValueError("a bug")) is None


class ExecuteBatchError(Exception):
    """Stands in for grpcio's private error of a batch sent on a call that is gone (matched by name)."""


class _GoneWhileAborting:
    """A servicer context whose caller leaves just as the status is sent."""

    def cancelled(self) -> bool:
        return False

    def trailing_metadata(self) -> tuple[()]:
        return ()

    async def abort(self, code: Any, details: str, metadata: Any = ()) -> None:
        raise ExecuteBatchError('Failed "execute_batch"')


@pytest.mark.parametrize(
    "failure",
    [errors.DeadlineExceeded("the caller's deadline ran out"), RuntimeError("a bug")],
    ids=["mapped", "unhandled"],
)
async def test_a_status_that_cannot_be_sent_ends_the_call_cancelled(failure: Exception) -> None:
    context: Any = _GoneWhileAborting()
    with pytest.raises(asyncio.CancelledError) as ended:
        await grpc_errors.handle_error(failure, "/x.Y/Z", context)
    assert ended.value.__cause__ is failure
