"""A TCP forwarder whose faults a test switches on and off: latency, a black hole, resets, refusals.

The proxy listens on 127.0.0.1 and forwards every connection to one target (Postgres or
Redis in the chaos tests), in an event loop of its own in a background thread, so that
the test's loop can stall without stalling the traffic. Faults apply to open connections
and to new ones:

- latency: every chunk of bytes is delivered `latency` seconds after it was read, in each
  direction (a round trip gains twice that), without limiting throughput;
- black hole: nothing is delivered and no new upstream connection is made until `heal()`;
  bytes and end-of-stream are held in order and delivered afterwards, as TCP would
  retransmit them after a short partition. A peer that gives up meanwhile (a timeout)
  closes its side, and that close is delivered in order too;
- reset: `reset_all()` aborts every open connection with a TCP RST on both sides and
  drops whatever it held;
- refuse: new connections are reset at once, like a port nobody listens on.

Run it by hand with `python -m devstack.tcp_proxy --target 127.0.0.1:5432 --latency 0.05`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Self, TypeVar

from devstack.processes import StartStop
from devstack.servers import LOCALHOST

logger = logging.getLogger(__name__)

_CHUNK = 65536
_CONNECT_TIMEOUT_S = 10.0
_CONTROL_TIMEOUT_S = 10.0
_T = TypeVar("_T")
# A held chunk: when it may be delivered, and the bytes (None stands for end-of-stream).
_Held = tuple[float, bytes | None]


@dataclass(frozen=True, slots=True)
class ProxyStats:
    """Counters of one proxy since it started."""

    accepted: int
    open: int
    resets: int
    refused: int
    bytes_up: int
    bytes_down: int


class _Pipe:
    """One forwarded connection: a client side, an upstream side and a pump per direction."""

    def __init__(self, proxy: TcpProxy, client: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.proxy = proxy
        self.client_reader, self.client_writer = client
        self.upstream_writer: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        """Connect upstream (after a black hole heals), then pump both ways until both sides are done."""
        proxy = self.proxy
        try:
            await proxy.flowing.wait()
            async with asyncio.timeout(_CONNECT_TIMEOUT_S):
                upstream_reader, self.upstream_writer = await asyncio.open_connection(
                    proxy.target_host, proxy.target_port
                )
        except (OSError, TimeoutError):
            _abort(self.client_writer)
            return
        self.tasks = [
            asyncio.create_task(self._pump(self.client_reader, self.upstream_writer, up=True)),
            asyncio.create_task(self._pump(upstream_reader, self.client_writer, up=False)),
        ]
        try:
            # A reset cancels the pumps; that ends this connection, not the proxy.
            await asyncio.gather(*self.tasks, return_exceptions=True)
        finally:
            self.close()

    def reset(self) -> None:
        """Abort both sides with an RST and stop the pumps."""
        for task in self.tasks:
            task.cancel()
        _abort(self.client_writer)
        if self.upstream_writer is not None:
            _abort(self.upstream_writer)

    def close(self) -> None:
        """Close both sides normally."""
        for writer in (self.client_writer, self.upstream_writer):
            if writer is not None and not writer.is_closing():
                writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool) -> None:
        """Read from one side and deliver to the other, each chunk held for the latency and while black-holed."""
        held: asyncio.Queue[_Held] = asyncio.Queue()
        deliver = asyncio.create_task(self._deliver(held, writer))
        try:
            while True:
                try:
                    data = await reader.read(_CHUNK)
                except OSError:
                    data = b""
                if deliver.done():
                    return  # the other side is gone; nothing more can be delivered
                held.put_nowait((time.monotonic() + self.proxy.latency, data or None))
                if not data:
                    break
                self.proxy.count_bytes(len(data), up=up)
            await deliver
        finally:
            if not deliver.done():
                deliver.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await deliver

    async def _deliver(self, held: asyncio.Queue[_Held], writer: asyncio.StreamWriter) -> None:
        flowing = self.proxy.flowing
        while True:
            due, data = await held.get()
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await flowing.wait()
            try:
                if data is None:
                    if writer.can_write_eof():
                        writer.write_eof()
                    await writer.drain()
                    return
                writer.write(data)
                await writer.drain()
            except OSError:
                return


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close a connection with an RST instead of a FIN (SO_LINGER with a zero timeout)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpProxy(StartStop):
    """Forwards 127.0.0.1:`port` to a target, with faults switched on and off from any thread."""

    def __init__(self, target_host: str, target_port: int, *, listen_port: int = 0) -> None:
        """Describe the proxy; nothing listens until `start()` (port 0 picks a free one)."""
        self.target_host = target_host
        self.target_port = target_port
        self.host = LOCALHOST
        self.port = listen_port
        self.latency = 0.0
        self.refusing = False
        self.flowing = asyncio.Event()  # set while traffic flows; used only inside the proxy's loop
        self.flowing.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._pipes: set[_Pipe] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._counts = {"accepted": 0, "resets": 0, "refused": 0, "bytes_up": 0, "bytes_down": 0}
        self._lock = threading.Lock()

    # -- life cycle

    def start(self) -> Self:
        """Start listening (in a background thread with its own loop) and return once it accepts."""
        if self._thread is not None:
            raise RuntimeError("the proxy is already started")
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._listen())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._close_all())
                loop.close()

        self._thread = threading.Thread(target=serve, name=f"tcp-proxy-{self.target_port}", daemon=True)
        self._thread.start()
        if not ready.wait(_CONTROL_TIMEOUT_S):
            raise RuntimeError("the proxy did not start listening in time")
        if failure:
            self._thread.join(_CONTROL_TIMEOUT_S)
            self._thread = None
            raise failure[0]
        return self

    def stop(self) -> None:
        """Close the listener and every connection; idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop may already be closed
            loop.call_soon_threadsafe(loop.stop)
        thread.join(_CONTROL_TIMEOUT_S)
        self._thread = None
        self._loop = None

    # -- where to connect

    @property
    def address(self) -> str:
        """host:port to dial instead of the target."""
        return f"{self.host}:{self.port}"

    def stats(self) -> ProxyStats:
        """A snapshot of the counters."""
        with self._lock:
            counts = dict(self._counts)
        return ProxyStats(open=len(self._pipes), **counts)

    # -- faults (callable from any thread)

    def set_latency(self, seconds: float) -> None:
        """Delay every chunk by `seconds` in each direction (0 turns latency off)."""
        if seconds < 0:
            raise ValueError("latency must not be negative")
        self.latency = seconds

    def black_hole(self) -> None:
        """Stop delivering anything, and stop connecting new clients upstream, until `heal()`."""
        self._call(self._set_flowing(False))

    def heal(self) -> None:
        """End a black hole: held bytes go out in order, waiting clients connect upstream."""
        self._call(self._set_flowing(True))

    def refuse(self, refusing: bool = True) -> None:
        """Reset new connections at once (True) or accept them again (False)."""
        self.refusing = refusing

    def reset_all(self) -> int:
        """Abort every open connection with an RST on both sides; return how many there were."""
        return self._call(self._reset_all())

    # -- inside the proxy's loop

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            self._count("refused")
            _abort(writer)
            return
        self._count("accepted")
        pipe = _Pipe(self, (reader, writer))
        self._pipes.add(pipe)
        try:
            await pipe.run()
        except asyncio.CancelledError:
            pipe.reset()
            raise
        except Exception:
            logger.exception("proxy connection to %s:%s failed", self.target_host, self.target_port)
            pipe.reset()
        finally:
            self._pipes.discard(pipe)

    async def _set_flowing(self, flowing: bool) -> None:
        if flowing:
            self.flowing.set()
        else:
            self.flowing.clear()

    async def _reset_all(self) -> int:
        pipes = list(self._pipes)
        for pipe in pipes:
            pipe.reset()
        self._count("resets", len(pipes))
        return len(pipes)

    async def _close_all(self) -> None:
        if self._server is not None:
            self._server.close()
        for pipe in list(self._pipes):
            pipe.reset()
        # Let the cancelled pumps and connection handlers finish before the loop closes.
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def count_bytes(self, amount: int, *, up: bool) -> None:
        """Add forwarded bytes to the counters."""
        self._count("bytes_up" if up else "bytes_down", amount)

    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount

    def _call(self, work: Coroutine[Any, Any, _T]) -> _T:
        loop = self._loop
        if loop is None:
            work.close()
            raise RuntimeError("the proxy is not running")
        return asyncio.run_coroutine_threadsafe(work, loop).result(_CONTROL_TIMEOUT_S)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or LOCALHOST, int(port)


def main() -> int:
    """Forward until SIGINT or SIGTERM, with a fixed latency."""
    parser = argparse.ArgumentParser(description="Forward a local port to a target, with added latency.")
    parser.add_argument("--target", required=True, help="host:port to forward to")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0 picks one)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added in each direction")
    args = parser.parse_args()
    host, port = _host_port(args.target)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with TcpProxy(host, port, listen_port=args.port) as proxy:
        proxy.set_latency(args.latency)
        print(f"forwarding {proxy.address} -> {host}:{port} (latency {args.latency:g}s); Ctrl-C stops", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
