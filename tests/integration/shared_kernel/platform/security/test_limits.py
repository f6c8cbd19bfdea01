"""The server limits from settings, observed through real channels."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from .conftest import COMMANDS, Gate, ServeFactory, unary

pytestmark = pytest.mark.integration


async def test_calls_beyond_the_concurrency_limit_are_resource_exhausted(serve: ServeFactory, gate: Gate):
    async with (
        serve(grpc_max_concurrent_rpcs=2) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        hold = unary(channel, f"/{COMMANDS}/Hold")
        held = [asyncio.ensure_future(hold(b"", timeout=10)) for _ in range(2)]
        await gate.wait_inside(2)

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unary(channel, f"/{COMMANDS}/RegisterUser")(b"", timeout=5)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        gate.release.set()
        assert await asyncio.gather(*held) == [b"released", b"released"]
        # Capacity is back once the held calls finish.
        assert await unary(channel, f"/{COMMANDS}/RegisterUser")(b"", timeout=5) == b"anonymous"


async def test_a_client_that_pings_too_often_is_disconnected(serve: ServeFactory, gate: Gate):
    async with serve(grpc_min_client_ping_interval_s=5, grpc_max_ping_strikes=1) as server:
        # This client pings every 50 ms, far more often than the server tolerates.
        options = [
            ("grpc.keepalive_time_ms", 50),
            ("grpc.keepalive_timeout_ms", 1000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=options) as channel:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await unary(channel, f"/{COMMANDS}/Hold")(b"", timeout=20)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        # gRPC's client backs off its own pings; the server's GOAWAY still comes well before the call's deadline.
        assert time.monotonic() - started < 15


async def test_connections_are_recycled_after_their_maximum_age(serve: ServeFactory, gate: Gate):
    async with (
        serve(grpc_max_connection_age_s=0.3, grpc_max_connection_age_grace_s=0.3) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        started = time.monotonic()
        # A call outliving the connection's age plus grace is cut off...
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unary(channel, f"/{COMMANDS}/Hold")(b"", timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 5
        # ...and the channel reconnects for the next one.
        assert await unary(channel, f"/{COMMANDS}/RegisterUser")(b"", timeout=5) == b"anonymous"
