"""Several worker processes behind one port: the parent of a group and each worker's end of it.

`python -m read_service` and `python -m write_service` become such a parent when their
`<PREFIX>_WORKERS` setting is above 1. The parent binds no listening socket. It reserves the
port (a bound, never listening socket with SO_REUSEPORT, which also settles port 0 before any
worker starts), then runs N children, each a complete service (`python -m <module>` with
`<PREFIX>_WORKERS=1`) listening on that port with SO_REUSEPORT; the kernel spreads new
connections over the listening workers.

Each child gets one end of a Unix socket pair (`<PREFIX>_WORKER_CONTROL_FD`):

- the worker writes `ready 1` / `ready 0` when its readiness changes;
- the parent writes `group 1` / `group 0`: whether every worker of the group is alive and ready;
- end of file tells the worker that the parent is gone, and the worker shuts down gracefully.

A worker reports SERVING only while it is ready AND the whole group is, so whichever worker a
health probe reaches, it sees the group's state. SIGTERM or SIGINT to the parent stops every
worker (each drains its calls within GRPC_SHUTDOWN_GRACE_S); the parent exits 0 when all of them
exited 0. A worker that dies is started again after a pause that doubles up to the group's
longest restart pause; `max_crashes` crashes in a row without becoming ready in between make
the whole group stop and exit 1, so the orchestrator sees a real failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from shared_kernel.platform.backoff import Backoff
from shared_kernel.platform.grpc_server import GrpcServer

logger = logging.getLogger(__name__)

# Time the parent gives its workers beyond their own drain period before it kills them.
STOP_MARGIN_S = 3.0
RESTART_INITIAL_BACKOFF_S = 0.5
# A worker that stays up this long after a crash has its restart pause reset to the initial one.
STABLE_UPTIME_S = 30.0

_READY = b"ready"
_GROUP = b"group"


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """What a worker group runs and how it watches over it."""

    # Names the group in its log lines ("read", "write").
    label: str
    # Each worker is `python -m <module>`.
    module: str
    # The workers' settings prefix: <PREFIX>_WORKERS, <PREFIX>_WORKER_INDEX, <PREFIX>_WORKER_CONTROL_FD.
    env_prefix: str
    workers: int
    host: str
    port: int
    shutdown_grace_s: float
    restart_max_backoff_s: float
    max_crashes: int
    # More environment for every worker, and more fields for the group's start-up log line.
    env: Mapping[str, str] = field(default_factory=dict)
    log_extra: Mapping[str, object] = field(default_factory=dict)


# --- the worker's side ----------------------------------------------------------------


class GroupLink:
    """A worker's end of the control socket: reports its readiness, learns the group's."""

    def __init__(self, fd: int, index: int) -> None:
        self.index = index
        self._sock = socket.socket(fileno=fd)
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._server: GrpcServer | None = None
        self._ready = False
        self._group_serving = False
        self.parent_gone: asyncio.Future[None] | None = None

    async def open(self) -> None:
        """Start listening to the parent."""
        reader, self._writer = await asyncio.open_unix_connection(sock=self._sock)
        self.parent_gone = asyncio.get_running_loop().create_future()
        self._reader_task = asyncio.create_task(self._listen(reader), name="worker-group-link")

    async def close(self) -> None:
        """Stop listening and close the socket."""
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()

    async def readiness_hook(self, server: GrpcServer, ready: bool) -> None:
        """Tell the parent about this worker's readiness; health follows the group's."""
        self._server = server
        self._ready = ready
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(b"%s %d\n" % (_READY, int(ready)))
            with contextlib.suppress(OSError):
                await self._writer.drain()
        await self._apply()

    async def _apply(self) -> None:
        if self._server is not None:
            await self._server.set_serving(self._ready and self._group_serving)

    async def _listen(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while line := await reader.readline():
                kind, _, value = line.strip().partition(b" ")
                if kind == _GROUP:
                    self._group_serving = value == b"1"
                    await self._apply()
        # End of file: the parent exited (or was killed) without stopping this worker.
        self._group_serving = False
        await self._apply()
        if self.parent_gone is not None and not self.parent_gone.done():
            logger.warning("the worker group's parent is gone; shutting down", extra={"worker": self.index})
            self.parent_gone.set_result(None)


# --- the parent -----------------------------------------------------------------------


class PortInUse(RuntimeError):
    """The port the group should serve is already taken."""


def _bind_host(host: str) -> str | None:
    host = host.strip("[]")
    return host or None


def reserve_port(host: str, port: int) -> tuple[list[socket.socket], int]:
    """Bind (without listening) every address of `host` on `port` with SO_REUSEPORT; return them and the port.

    A fixed port that something already holds is refused first: with SO_REUSEPORT the workers
    would otherwise quietly share it with whatever holds it.
    """
    infos = socket.getaddrinfo(_bind_host(host), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    addresses = list(dict.fromkeys((family, sockaddr[0]) for family, _, _, _, sockaddr in infos))
    if port != 0:
        for family, address in addresses:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((address, port))
                except OSError as exc:
                    raise PortInUse(f"{address}:{port} is already in use ({exc.strerror})") from exc
    reserved: list[socket.socket] = []
    chosen = port
    try:
        for family, address in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            reserved.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address, chosen))
            chosen = sock.getsockname()[1]
    except BaseException:
        for sock in reserved:
            sock.close()
        raise
    return reserved, chosen


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None
    ready: bool = False
    started_at: float = 0.0
    crashes: int = 0  # in a row, without becoming ready in between
    listener: asyncio.Task[None] | None = None


class WorkerGroup:
    """The parent of a group of service workers sharing one port."""

    def __init__(self, spec: GroupSpec, *, python: str = sys.executable) -> None:
        self.spec = spec
        self.python = python
        self.port = 0
        self._workers = [_Worker(index) for index in range(spec.workers)]
        self._stopping = asyncio.Event()
        self._failure: str | None = None
        self._group_serving: bool | None = None

    @property
    def pids(self) -> list[int]:
        """Pids of the workers running now."""
        return [w.process.pid for w in self._workers if w.process is not None and w.process.returncode is None]

    async def run(self) -> int:
        """Reserve the port, run the workers until a signal (or a crash loop), stop them; the exit code."""
        try:
            reserved, self.port = reserve_port(self.spec.host, self.spec.port)
        except (PortInUse, OSError) as exc:
            logger.error("%s worker group refused to start: %s", self.spec.label, exc)  # noqa: TRY400 - an environment issue
            return 1
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        try:
            logger.info(
                "%s worker group listening",
                self.spec.label,
                extra={
                    "address": f"{self.spec.host}:{self.port}",
                    "workers": len(self._workers),
                    **self.spec.log_extra,
                },
            )
            supervisors = [asyncio.create_task(self._supervise(w), name=f"worker-{w.index}") for w in self._workers]
            for task in supervisors:
                task.add_done_callback(self._supervisor_done)
            await self._stopping.wait()
            logger.info("%s worker group shutting down", self.spec.label, extra={"reason": self._failure or "signal"})
            clean = await self._stop_all(supervisors)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            for sock in reserved:
                sock.close()
        if self._failure is not None:
            logger.error("%s worker group failed: %s", self.spec.label, self._failure)
            return 1
        return 0 if clean else 1

    def _worker_env(self, worker: _Worker, fd: int) -> dict[str, str]:
        prefix = self.spec.env_prefix
        return {
            **os.environ,
            **self.spec.env,
            f"{prefix}_WORKERS": "1",
            f"{prefix}_WORKER_INDEX": str(worker.index),
            f"{prefix}_WORKER_CONTROL_FD": str(fd),
            "GRPC_PORT": str(self.port),
            "GRPC_SO_REUSEPORT": "true",
        }

    async def _spawn(self, worker: _Worker) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            worker.process = await asyncio.create_subprocess_exec(
                self.python,
                "-m",
                self.spec.module,
                env=self._worker_env(worker, child_end.fileno()),
                pass_fds=(child_end.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        worker.started_at = time.monotonic()
        worker.ready = False
        if self._stopping.is_set():
            self._terminate(worker)  # started while the group began to stop: stop it with the others
        reader, worker.writer = await asyncio.open_unix_connection(sock=parent_end)
        worker.listener = asyncio.create_task(self._listen(worker, reader), name=f"worker-{worker.index}-link")
        logger.info("%s worker started", self.spec.label, extra={"worker": worker.index, "pid": worker.process.pid})
        # The newcomer learns the group's state at once (it is not ready yet, so: not serving).
        await self._publish(force=True)

    async def _listen(self, worker: _Worker, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while line := await reader.readline():
                kind, _, value = line.strip().partition(b" ")
                if kind == _READY:
                    worker.ready = value == b"1"
                    if worker.ready:
                        worker.crashes = 0
                    await self._publish()

    async def _publish(self, *, force: bool = False) -> None:
        """Send every worker the group's state when it changed (or when `force`)."""
        serving = not self._stopping.is_set() and all(
            w.ready and w.process is not None and w.process.returncode is None for w in self._workers
        )
        if serving == self._group_serving and not force:
            return
        if serving != self._group_serving:
            logger.info("%s worker group %s", self.spec.label, "SERVING" if serving else "NOT_SERVING")
        self._group_serving = serving
        message = b"%s %d\n" % (_GROUP, int(serving))
        for w in self._workers:
            if w.writer is not None and not w.writer.is_closing():
                w.writer.write(message)
                with contextlib.suppress(OSError):
                    await w.writer.drain()

    def _supervisor_done(self, task: asyncio.Task[None]) -> None:
        # A worker that cannot even be started (or a bug here) stops the group rather than leaving it short.
        if not task.cancelled() and task.exception() is not None:
            self._failure = f"{task.get_name()} could not be supervised: {task.exception()!r}"
            self._stopping.set()

    async def _supervise(self, worker: _Worker) -> None:
        backoff = Backoff(RESTART_INITIAL_BACKOFF_S, self.spec.restart_max_backoff_s)
        while not self._stopping.is_set():
            await self._spawn(worker)
            assert worker.process is not None
            code = await worker.process.wait()
            await self._detach(worker)
            if self._stopping.is_set():
                return
            worker.ready = False
            await self._publish()
            uptime = time.monotonic() - worker.started_at
            worker.crashes += 1
            if uptime >= STABLE_UPTIME_S:
                backoff.reset()
            if worker.crashes >= self.spec.max_crashes:
                self._failure = (
                    f"worker {worker.index} crashed {worker.crashes} times in a row without becoming ready "
                    f"(last exit: {_describe(code)})"
                )
                self._stopping.set()
                return
            logger.error(
                "%s worker exited unexpectedly; restarting it",
                self.spec.label,
                extra={
                    "worker": worker.index,
                    "pid": worker.process.pid,
                    "exit": _describe(code),
                    "restart_in_s": round(delay := backoff.next_delay(), 3),
                },
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _detach(self, worker: _Worker) -> None:
        if worker.listener is not None:
            worker.listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker.listener
            worker.listener = None
        if worker.writer is not None:
            worker.writer.close()
            worker.writer = None

    async def _stop_all(self, supervisors: list[asyncio.Task[None]]) -> bool:
        """SIGTERM every worker, wait for them within the grace period, kill the rest; whether all exited 0."""
        await self._publish()
        for worker in self._workers:
            self._terminate(worker)
        budget = self.spec.shutdown_grace_s + STOP_MARGIN_S
        _, pending = await asyncio.wait(supervisors, timeout=budget)
        clean = not pending
        for worker in self._workers:
            process = worker.process
            if process is not None and process.returncode is None:
                logger.error("%s worker did not stop in time; killing it", self.spec.label, extra={"pid": process.pid})
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        if pending:
            await asyncio.wait(pending, timeout=10.0)
        for task in supervisors:
            task.cancel()
        await asyncio.gather(*supervisors, return_exceptions=True)
        for worker in self._workers:
            code = worker.process.returncode if worker.process is not None else 0
            if code != 0:
                logger.error(
                    "%s worker stopped with %s", self.spec.label, _describe(code or 0), extra={"worker": worker.index}
                )
                clean = False
        logger.info("%s worker group stopped", self.spec.label, extra={"clean": clean})
        return clean

    @staticmethod
    def _terminate(worker: _Worker) -> None:
        process = worker.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"
