"""Several worker processes behind one port: `READ_WORKERS=N python -m read_service`.

The group itself (the parent reserving the port, the workers listening on it with
SO_REUSEPORT, the control socket between them, restarts and shutdown) is
`shared_kernel.platform.worker_group`; each read worker is a complete read service, and the group is
SERVING only when every worker's projector is ready.

Every reply names the process that served it in the `x-tessera-replica` header:
`<READ_REPLICA_ID>/<pid>`; a query's unary reply carries it as trailing metadata (it travels
with the status, at no extra cost), a health check or a stream as initial metadata.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc

from read_service.settings import ReadServiceSettings
from shared_kernel.platform import worker_group
from shared_kernel.platform.interceptors import Handler, HandlerInterceptor, rewrap
from shared_kernel.platform.worker_group import STOP_MARGIN_S, GroupLink, PortInUse, reserve_port

REPLICA_HEADER = "x-tessera-replica"

# Unary methods whose replies carry the replica header as initial metadata (the rest: as a trailer).
_HEADER_METHODS = ("/grpc.health.",)


# --- the response header --------------------------------------------------------------


class _HeaderContext:
    """A servicer context that adds the replica header to the first initial metadata sent."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], header: tuple[str, str]) -> None:
        self._context = context
        self._header = header
        self.sent = False

    async def send_initial_metadata(self, metadata: Iterable[tuple[str, str | bytes]]) -> None:
        """Send the servicer's initial metadata with the replica header added."""
        self.sent = True
        await self._context.send_initial_metadata((self._header, *metadata))

    async def send_header(self) -> None:
        """Send the replica header alone unless initial metadata went out already."""
        if not self.sent:
            self.sent = True
            await self._context.send_initial_metadata((self._header,))

    async def write(self, message: Any) -> None:
        """Stream a message, after the header."""
        await self.send_header()
        await self._context.write(message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class ReplicaHeaderInterceptor(HandlerInterceptor):
    """Adds `x-tessera-replica: <replica id>/<pid>` to every reply.

    Unary query calls carry it in their trailing metadata, failed calls too (the error mapping
    keeps it beside the status details): set before the handler runs, it travels in the batch
    that sends the reply and the status, where an initial header would cost a batch of its own
    per call. A GrpcServer sets that trailer in the call wrapper every unary call already goes
    through (`unary_trailing_metadata`), so this interceptor leaves those calls alone there;
    given to a server that does not know the attribute, it sets the trailer itself. Health
    checks (what probes and tools that count workers read) and server streams carry it in
    their initial metadata, a stream's before its first message or its end.
    Client streams and reflection pass through untouched. A server stream keeps its handler's
    shape: an async generator is wrapped in one, a coroutine that streams with `context.write`
    (the health servicer's Watch, which client-side health checking relies on) in a coroutine,
    so its messages go straight to the caller without a generator in between.
    """

    reuse_unary = True

    def __init__(self, replica_id: str, pid: int | None = None) -> None:
        super().__init__()
        self.value = f"{replica_id}/{pid if pid is not None else os.getpid()}"
        self._header = (REPLICA_HEADER, self.value)
        self._trailer = (self._header,)
        # Taken over by the server's call wrapper (GrpcServer), which then sets it on unary calls.
        self.unary_trailing_metadata: tuple[tuple[str, str], ...] = self._trailer
        self.trailer_taken_over = False

    def wrap(self, handler: Handler, details: grpc.HandlerCallDetails) -> Handler:
        """Wrap unary-unary and unary-stream handlers."""
        if handler.unary_unary is not None:
            in_header = details.method.startswith(_HEADER_METHODS)
            if not in_header and self.trailer_taken_over:
                return handler
            return rewrap(handler, lambda inner, _kind: self._unary(inner) if in_header else self._trailing(inner))
        if handler.unary_stream is not None:
            return rewrap(handler, lambda inner, _kind: self._stream(inner))
        return handler

    def _trailing(self, inner: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        trailer = self._trailer

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            context.set_trailing_metadata(trailer)
            return await inner(request, context)

        return unary

    def _unary(self, inner: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        header = self._header

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            wrapped = _HeaderContext(context, header)
            try:
                reply = await inner(request, wrapped)
            except grpc.aio.AbortError:
                raise
            except Exception:
                # Best effort: the error that follows matters more than the header.
                with contextlib.suppress(Exception):
                    await wrapped.send_header()
                raise
            await wrapped.send_header()
            return reply

        return unary

    def _stream(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        header = self._header
        if not inspect.isasyncgenfunction(inner):

            async def written(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
                wrapped = _HeaderContext(context, header)
                await inner(request, wrapped)
                await wrapped.send_header()

            return written

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            wrapped = _HeaderContext(context, header)
            async for item in inner(request, wrapped):
                await wrapped.send_header()
                yield item
            await wrapped.send_header()

        return stream


# --- the group -------------------------------------------------------------------------


class WorkerGroup(worker_group.WorkerGroup):
    """The parent of a group of read service workers sharing one port."""

    def __init__(self, settings: ReadServiceSettings, *, python: str = sys.executable) -> None:
        super().__init__(
            worker_group.GroupSpec(
                label="read",
                module="read_service",
                env_prefix="READ",
                workers=settings.read_workers,
                host=settings.grpc_host,
                port=settings.grpc_port,
                shutdown_grace_s=settings.grpc_shutdown_grace_s,
                restart_max_backoff_s=settings.read_worker_restart_max_backoff_s,
                max_crashes=settings.read_worker_max_crashes,
                env={"READ_REPLICA_ID": settings.read_replica_id},
                log_extra={"replica": settings.read_replica_id},
            ),
            python=python,
        )
        self.settings = settings


__all__ = [
    "REPLICA_HEADER",
    "STOP_MARGIN_S",
    "GroupLink",
    "PortInUse",
    "ReplicaHeaderInterceptor",
    "WorkerGroup",
    "reserve_port",
]
