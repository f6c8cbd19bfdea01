"""Bodies that do not parse, through every kind of handler, on the real services' servers."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_reflection.v1alpha import reflection_pb2

from shared_kernel.contracts import errors
from shared_kernel.platform.grpc_errors import bad_request_from_status, status_for

from .conftest import HostileStack
from .matrix import CORRUPT_TAGS, INVALID_UTF8, QUERIES, bytes_field

REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"


def test_deadline_exceeded_has_its_code() -> None:
    status = status_for(errors.DeadlineExceeded("the caller's deadline passed"))
    assert status.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert status.details == "the caller's deadline passed"


async def test_unparsable_unary_body_is_a_bad_request(hostile: HostileStack) -> None:
    method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = hostile.read.unary_unary(QUERIES + "GetUser")
    try:
        await method(bytes_field(1, INVALID_UTF8), timeout=5)
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        bad_request = bad_request_from_status(error)
        assert bad_request is not None
        [violation] = bad_request.field_violations
        assert violation.field == "request"
        assert "tessera.users.v1.GetUserRequest" in violation.description
    else:
        raise AssertionError("a body that is not UTF-8 was accepted")


async def test_unparsable_body_on_a_server_streaming_method(hostile: HostileStack) -> None:
    for channel in (hostile.write, hostile.read):
        watch: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(HEALTH_WATCH)
        call = watch(CORRUPT_TAGS, timeout=5)
        try:
            async for _ in call:
                raise AssertionError("Watch answered a corrupt body")
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error


async def test_unparsable_body_on_a_bidirectional_stream(hostile: HostileStack) -> None:
    """Reflection reads its requests lazily: the bad one is refused when it arrives."""
    for channel in (hostile.write, hostile.read):
        info: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(REFLECTION)
        call = info(timeout=5)
        good = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
        await call.write(good)
        first = await call.read()
        assert isinstance(first, bytes) and b"tessera" in first
        await call.write(CORRUPT_TAGS)
        await call.done_writing()
        try:
            while await call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        else:
            code = await call.code()
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, await call.details())
        status = status_pb2.Status.FromString(dict(await call.trailing_metadata())["grpc-status-details-bin"])
        assert any(d.Is(error_details_pb2.BadRequest.DESCRIPTOR) for d in status.details)
