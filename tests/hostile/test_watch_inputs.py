"""Hostile inputs to the Watch RPCs (server streaming, so outside the unary matrix) on the real replica."""

from __future__ import annotations

import grpc
import pytest

from shared_kernel.platform.grpc_errors import bad_request_from_status

from .conftest import HostileStack
from .matrix import CORRUPT_TAGS, INVALID_UTF8, bytes_field

WATCHES = {
    "/tessera.users.v1.UserQueryService/WatchUser": "user_id",
    "/tessera.orders.v1.OrderQueryService/WatchOrder": "order_id",
    "/tessera.orders.v1.OrderQueryService/WatchOrdersByCustomer": "customer_id",
}
BAD_IDS = [b"", b"not-a-uuid", b"7d444840-9dc0-11d1-b245-5ffdce74fad2x", b"\x00" * 36, b"x" * 100_000]


async def first_error(channel: grpc.aio.Channel, method: str, body: bytes) -> grpc.aio.AioRpcError:
    watch: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(method)
    call = watch(body, timeout=5)
    try:
        async for _ in call:
            raise AssertionError(f"{method} streamed an answer to a bad request")
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError(f"{method} ended without an error")


@pytest.mark.parametrize("method", sorted(WATCHES))
async def test_bad_ids_are_invalid_argument_naming_the_field(hostile: HostileStack, method: str) -> None:
    for value in BAD_IDS:
        error = await first_error(hostile.read, method, bytes_field(1, value))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (value[:20], error)
        bad_request = bad_request_from_status(error)
        assert bad_request is not None
        assert [v.field for v in bad_request.field_violations] == [WATCHES[method]]


@pytest.mark.parametrize("method", sorted(WATCHES))
async def test_bodies_that_do_not_parse_are_invalid_argument(hostile: HostileStack, method: str) -> None:
    for body in (CORRUPT_TAGS, bytes_field(1, INVALID_UTF8)):
        error = await first_error(hostile.read, method, body)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error


def varint_field(number: int, value: int) -> bytes:
    """One varint field of a message, encoded by hand (the wire form a resume point takes)."""
    out = bytearray([number << 3])
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


@pytest.mark.parametrize("method", sorted(WATCHES))
async def test_resume_points_above_the_log_head_are_invalid_argument(hostile: HostileStack, method: str) -> None:
    """No replica ever sent such a position; a valid id, so only after_position is wrong."""
    known_id = b"7d444840-9dc0-11d1-b245-5ffdce74fad2"
    for position in (10**12, 2**63, 2**64 - 1):
        error = await first_error(hostile.read, method, bytes_field(1, known_id) + varint_field(2, position))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (position, error)
        bad_request = bad_request_from_status(error)
        assert bad_request is not None
        assert [v.field for v in bad_request.field_violations] == ["after_position"]
