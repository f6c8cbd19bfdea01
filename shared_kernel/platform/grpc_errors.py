"""The one place where errors become gRPC status codes.

`ErrorMappingInterceptor` wraps every unary and server-streaming handler: the
project's DomainErrors map to their documented codes (INVALID_ARGUMENT carries
`google.rpc.BadRequest` field violations), driver errors that mean "a dependency is
down" map to UNAVAILABLE, transient database conflicts to ABORTED, and anything else
is a bug: logged with its traceback and answered INTERNAL. A handler never leaks
UNKNOWN.

It also wraps each handler's request deserializer: grpcio calls it before any handler
or interceptor code runs and answers UNKNOWN when it raises, so a body that is not a
valid protobuf message (corrupt wire format, a string field that is not UTF-8) would
reach the caller as UNKNOWN. The wrapper turns such a body into an `UndecodableRequest`
stand-in, and the wrapped handler answers INVALID_ARGUMENT before the servicer runs.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import asyncpg
import grpc
import redis.exceptions
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from shared_kernel.contracts import errors
from shared_kernel.platform.interceptors import Behaviour, CallKind, Handler, HandlerInterceptor, rewrap

logger = logging.getLogger(__name__)

_CODES: dict[type[errors.DomainError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Conflict: grpc.StatusCode.ABORTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# SQLSTATEs that mean "try again": serialization_failure, deadlock_detected.
_TRANSIENT_SQLSTATES = {"40001", "40P01"}

_UNAVAILABLE_TYPES: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    # What asyncpg raises when the server ends the session just as a query starts (asyncpg#1069).
    asyncpg.exceptions.InternalClientError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    ConnectionError,
    OSError,
    TimeoutError,
)


def to_domain_error(exc: BaseException) -> errors.DomainError | None:
    """Translate a driver exception into the project's error type, or None for a bug."""
    if isinstance(exc, errors.DomainError):
        return exc
    if isinstance(exc, asyncpg.PostgresError) and getattr(exc, "sqlstate", None) in _TRANSIENT_SQLSTATES:
        return errors.Conflict("transient database conflict, retry the request")
    if isinstance(exc, asyncpg.exceptions.QueryCanceledError):
        return errors.Unavailable("database call exceeded its time limit")
    if isinstance(exc, _UNAVAILABLE_TYPES):
        return errors.Unavailable(f"a dependency is unavailable: {type(exc).__name__}")
    return None


def status_for(error: errors.DomainError) -> grpc.Status:
    """Build the rich gRPC status (code, message, details) for a domain error."""
    code = grpc.StatusCode.INTERNAL
    for klass in type(error).__mro__:
        if klass in _CODES:
            code = _CODES[klass]
            break
    details: list[any_pb2.Any] = []
    if isinstance(error, errors.InvalidArgument):
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in error.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        details.append(packed)
    elif isinstance(error, errors.AlreadyExists) and error.field:
        info = error_details_pb2.ErrorInfo(reason="ALREADY_EXISTS", domain="tessera", metadata={"field": error.field})
        packed = any_pb2.Any()
        packed.Pack(info)
        details.append(packed)
    status = status_pb2.Status(code=_rpc_code(code), message=error.message, details=details)
    result: grpc.Status = rpc_status.to_status(status)
    return result


def _rpc_code(code: grpc.StatusCode) -> int:
    value: int = code.value[0]
    return value


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: errors.DomainError) -> NoReturn:
    """Abort the call with the status that belongs to `error`."""
    status = status_for(error)
    # Keep what the call set already (the replica trailer): abort's own metadata would replace it.
    await context.abort(status.code, status.details, (*(context.trailing_metadata() or ()), *status.trailing_metadata))
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


def _call_gone(exc: BaseException, context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    """Whether `exc` only says that the caller cancelled the call or reset its stream."""
    # Sending metadata or a message then fails in grpcio's batch with its private ExecuteBatchError
    # (hence the name rather than the class), often before the context reports the cancellation.
    # grpcio checks its own misuse (metadata sent twice) before any batch, with UsageError.
    return type(exc).__name__ == "ExecuteBatchError" or context.cancelled()


async def handle_error(exc: Exception, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
    """End the call with the status `exc` maps to (logged when it is a bug); quietly when the caller left."""
    if _call_gone(exc, context):
        # Nobody is left to answer: the call ends CANCELLED, quietly, like any cancelled call.
        raise asyncio.CancelledError from exc
    try:
        await _end_with_status(exc, method, context)
    except grpc.aio.AbortError:
        raise
    except Exception as failure:
        # The caller may leave while the status is being sent (its deadline ran out, say): the
        # send then fails like any other on a call that is gone, and the call ends the same way.
        if _call_gone(failure, context):
            raise asyncio.CancelledError from exc
        raise


async def _end_with_status(exc: Exception, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
    domain_error = to_domain_error(exc)
    if domain_error is None:
        logger.error("unhandled error in %s", method, exc_info=exc, extra={"rpc_method": method})
        await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        raise AssertionError("context.abort returned")  # pragma: no cover
    if isinstance(domain_error, errors.Unavailable | errors.Conflict):
        logger.warning("%s failed: %s", method, domain_error.message, extra={"rpc_method": method})
    elif isinstance(domain_error, errors.DeadlineExceeded):
        logger.info("%s gave up: %s", method, domain_error.message, extra={"rpc_method": method})
    await abort(context, domain_error)


class UndecodableRequest:
    """Stands in for a request body the protobuf runtime could not parse; never reaches a servicer."""

    __slots__ = ("error",)

    def __init__(self, error: errors.InvalidArgument | None) -> None:
        # None: the deserializer itself failed (a bug), answered INTERNAL.
        self.error = error


def _message_name(deserializer: Callable[[bytes], Any]) -> str:
    # Generated handlers pass `Message.FromString`, a method bound to the message class.
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", None)
    return name if isinstance(name, str) else "the request message"


def tolerant_deserializer(deserializer: Callable[[bytes], Any] | None, method: str) -> Callable[[bytes], Any] | None:
    """Wrap `deserializer` so that a body it cannot parse becomes an `UndecodableRequest`."""
    if deserializer is None:
        return None
    message_name = _message_name(deserializer)

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except (DecodeError, ValueError):
            # The body came from the caller: a parse failure is the caller's mistake. Its
            # text is not echoed back (it may be anything); the message type names the fix.
            return UndecodableRequest(
                errors.InvalidArgument.single(
                    "request",
                    f"is not a valid {message_name} (corrupt protobuf encoding, "
                    "or a string field that is not valid UTF-8)",
                )
            )
        except Exception:
            logger.exception("request deserializer of %s failed", method, extra={"rpc_method": method})
            return UndecodableRequest(None)

    return deserialize


class ErrorMappingInterceptor(HandlerInterceptor):
    """Maps exceptions raised by handlers to gRPC statuses (see the module docstring)."""

    def wrap(self, handler: Handler, details: grpc.HandlerCallDetails) -> Handler:
        """Wrap the behaviour and the request deserializer of the resolved handler, whatever its kind."""
        method = details.method

        def mapped(inner: Behaviour, kind: CallKind) -> Behaviour:
            if kind.streams_replies:
                return _wrap_stream(inner, method, streaming_request=kind.streams_requests)
            return _wrap_unary(inner, method, streaming_request=kind.streams_requests)

        return rewrap(handler, mapped, request_deserializer=tolerant_deserializer(handler.request_deserializer, method))


async def reject_undecodable(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Answer INVALID_ARGUMENT (INTERNAL for a failing deserializer) when `request` is an UndecodableRequest."""
    if isinstance(request, UndecodableRequest):
        if request.error is None:
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
            raise AssertionError("context.abort returned")  # pragma: no cover
        await abort(context, request.error)


async def _checked_requests(
    requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[Any]:
    # A streaming handler reads its requests lazily, so each one is checked as it arrives.
    async for request in requests:
        await reject_undecodable(request, context)
        yield request


def _wrap_unary(
    inner: Callable[..., Any], method: str, *, streaming_request: bool = False
) -> Callable[..., Awaitable[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            if streaming_request:
                request = _checked_requests(request, context)
            else:
                await reject_undecodable(request, context)
            return await inner(request, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:
            await handle_error(exc, method, context)

    return wrapped


def _wrap_stream(inner: Callable[..., Any], method: str, *, streaming_request: bool = False) -> Callable[..., Any]:
    if not inspect.isasyncgenfunction(inner):
        # A handler that streams with context.write() (grpc.health.v1.Health/Watch does) is
        # a coroutine, not a generator: await it, and its writes go straight to the caller.
        return _wrap_unary(inner, method, streaming_request=streaming_request)

    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        try:
            if streaming_request:
                request = _checked_requests(request, context)
            else:
                await reject_undecodable(request, context)
            async for item in inner(request, context):
                yield item
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:
            await handle_error(exc, method, context)

    return wrapped


def bad_request_from_status(error: grpc.aio.AioRpcError) -> error_details_pb2.BadRequest | None:
    """Client helper: extract BadRequest details from a failed call (used by tests and tools)."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad_request = error_details_pb2.BadRequest()
                    detail.Unpack(bad_request)
                    return bad_request
    return None


__all__ = [
    "ErrorMappingInterceptor",
    "UndecodableRequest",
    "abort",
    "bad_request_from_status",
    "handle_error",
    "reject_undecodable",
    "status_for",
    "to_domain_error",
    "tolerant_deserializer",
]
