"""Typed exceptions for every failed call: the status code, the message and the rich details.

The services map every failure to one status code (invalid input → INVALID_ARGUMENT with
`google.rpc.BadRequest` field violations, missing → NOT_FOUND, ...). `error_from_rpc` turns a
`grpc.RpcError` into the matching subclass of `TesseraError`, with the field violations and
the `google.rpc.ErrorInfo` decoded from the `grpc-status-details-bin` trailer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid field of a request, as `google.rpc.BadRequest` names it."""

    field: str
    description: str


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """`google.rpc.ErrorInfo`: a machine-readable reason and its metadata (e.g. which field was a duplicate)."""

    reason: str
    domain: str
    metadata: dict[str, str] = field(default_factory=dict)


class TesseraError(Exception):
    """A call that failed with a status code; subclasses name the code."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
        error_info: ErrorInfo | None = None,
        method: str = "",
    ) -> None:
        prefix = f"{method}: " if method else ""
        super().__init__(f"{prefix}{(code or self.code).name}: {message}")
        if code is not None:
            self.code = code
        self.message = message
        self.field_violations = field_violations
        self.error_info = error_info
        self.method = method
        # For a command: the key it was sent with, to retry it later without a second effect.
        self.idempotency_key: str | None = None

    def violation(self, field_name: str) -> FieldViolation | None:
        """The violation reported for `field_name`, if any."""
        return next((v for v in self.field_violations if v.field == field_name), None)


class InvalidArgument(TesseraError):
    """INVALID_ARGUMENT: see `field_violations`."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(TesseraError):
    """NOT_FOUND."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(TesseraError):
    """ALREADY_EXISTS: `error_info.metadata["field"]` names the duplicate field when the service says."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(TesseraError):
    """FAILED_PRECONDITION: a broken business rule or a stale expected version."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(TesseraError):
    """ABORTED: a transient conflict; safe to retry with the same idempotency key."""

    code = grpc.StatusCode.ABORTED


class Unavailable(TesseraError):
    """UNAVAILABLE: the service or one of its dependencies is down."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(TesseraError):
    """DEADLINE_EXCEEDED: the caller's deadline passed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(TesseraError):
    """UNAUTHENTICATED: no token, or one the service refused."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(TesseraError):
    """PERMISSION_DENIED: the token lacks the scope the call needs."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(TesseraError):
    """RESOURCE_EXHAUSTED: a limit of the service was reached."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Cancelled(TesseraError):
    """CANCELLED."""

    code = grpc.StatusCode.CANCELLED


class Internal(TesseraError):
    """INTERNAL: a bug in the service."""

    code = grpc.StatusCode.INTERNAL


class StaleRead(Exception):
    """A query carried a consistency token and the replica answered before reflecting it.

    `response` is the answer the replica had (its `stale` field is true); a caller that can
    use older data reads it from there.
    """

    def __init__(self, method: str, response: Any) -> None:
        super().__init__(f"{method}: the replica did not reflect the session's last write within the wait")
        self.method = method
        self.response = response


_BY_CODE: dict[grpc.StatusCode, type[TesseraError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Aborted,
        Unavailable,
        DeadlineExceeded,
        Unauthenticated,
        PermissionDenied,
        ResourceExhausted,
        Cancelled,
        Internal,
    )
}


def _decode_details(trailers: Any) -> tuple[tuple[FieldViolation, ...], ErrorInfo | None]:
    raw = next((value for key, value in (trailers or ()) if key == _DETAILS_KEY), None)
    if not isinstance(raw, bytes):
        return (), None
    status = status_pb2.Status()
    try:
        status.ParseFromString(raw)
    except DecodeError:
        return (), None
    violations: list[FieldViolation] = []
    info: ErrorInfo | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            decoded = error_details_pb2.ErrorInfo()
            detail.Unpack(decoded)
            info = ErrorInfo(decoded.reason, decoded.domain, dict(decoded.metadata))
    return tuple(violations), info


def error_from_rpc(error: grpc.RpcError, method: str = "") -> TesseraError:
    """The typed exception for a failed call (`error` is a grpc.aio.AioRpcError or a sync grpc.Call)."""
    code: grpc.StatusCode = error.code()
    message: str = error.details() or ""
    try:
        trailers = error.trailing_metadata()
    except Exception:  # a call without trailers still has a code and a message
        trailers = ()
    violations, info = _decode_details(trailers)
    cls = _BY_CODE.get(code, TesseraError)
    return cls(message, code=code, field_violations=violations, error_info=info, method=method)
