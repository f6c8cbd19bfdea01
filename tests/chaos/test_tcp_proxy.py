"""devstack.tcp_proxy against a real echo server: forwarding, latency, black hole, resets, refusals.

These run in the default suite (they take about a second); the scenarios that use the
proxy are in test_network_chaos.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from devstack.tcp_proxy import TcpProxy

DEADLINE_S = 5.0


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    """A server that echoes every byte back and closes when the client does."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    async with server:
        yield int(server.sockets[0].getsockname()[1])


@pytest.fixture
def proxy(echo_port: int) -> Iterator[TcpProxy]:
    """A proxy in front of the echo server."""
    with TcpProxy("127.0.0.1", echo_port) as running:
        yield running


async def round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    """Send `data` and read the same number of bytes back, within the deadline."""
    writer.write(data)
    await writer.drain()
    async with asyncio.timeout(DEADLINE_S):
        return await reader.readexactly(len(data))


async def test_forwards_both_ways_and_end_of_stream(proxy: TcpProxy) -> None:
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    payload = bytes(range(256)) * 1024
    assert await round_trip(reader, writer, payload) == payload
    writer.write_eof()
    async with asyncio.timeout(DEADLINE_S):
        assert await reader.read() == b""
    writer.close()
    stats = proxy.stats()
    assert stats.accepted == 1
    assert stats.bytes_up == stats.bytes_down == len(payload)


async def test_latency_delays_each_direction(proxy: TcpProxy) -> None:
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    await round_trip(reader, writer, b"warm")
    proxy.set_latency(0.1)
    started = time.monotonic()
    assert await round_trip(reader, writer, b"slow") == b"slow"
    assert time.monotonic() - started >= 0.2
    proxy.set_latency(0.0)
    writer.close()


async def test_black_hole_holds_traffic_until_healed(proxy: TcpProxy) -> None:
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    await round_trip(reader, writer, b"before")
    await asyncio.to_thread(proxy.black_hole)
    writer.write(b"held")
    await writer.drain()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await reader.readexactly(4)
    # A new connection is accepted but gets no answer either.
    new_reader, new_writer = await asyncio.open_connection(proxy.host, proxy.port)
    new_writer.write(b"late")
    await asyncio.to_thread(proxy.heal)
    async with asyncio.timeout(DEADLINE_S):
        assert await reader.readexactly(4) == b"held"
        assert await new_reader.readexactly(4) == b"late"
    writer.close()
    new_writer.close()


async def test_reset_all_aborts_open_connections(proxy: TcpProxy) -> None:
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    await round_trip(reader, writer, b"hello")
    assert await asyncio.to_thread(proxy.reset_all) == 1
    with pytest.raises(ConnectionResetError):
        async with asyncio.timeout(DEADLINE_S):
            await reader.read(1)
            raise AssertionError("read returned instead of failing")
    writer.close()
    assert proxy.stats().resets == 1
    # The proxy itself keeps accepting.
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    assert await round_trip(reader, writer, b"again") == b"again"
    writer.close()


async def test_refuse_resets_new_connections(proxy: TcpProxy) -> None:
    proxy.refuse(True)
    # The RST may arrive while connecting or on the first read, depending on timing.
    with pytest.raises(ConnectionResetError):
        async with asyncio.timeout(DEADLINE_S):
            reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
            try:
                await reader.read(1)
            finally:
                writer.close()
            raise AssertionError("read returned instead of failing")
    proxy.refuse(False)
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    assert await round_trip(reader, writer, b"open") == b"open"
    writer.close()
    assert proxy.stats().refused == 1
