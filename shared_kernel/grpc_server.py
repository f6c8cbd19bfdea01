"""gRPC server lifecycle shared by the write and read services.

create → add servicers → start (health + reflection) → serve until SIGTERM/SIGINT →
health NOT_SERVING → drain in-flight calls for a grace period → stop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from opentelemetry import context as otel_context
from opentelemetry import trace

from shared_kernel.grpc_errors import ErrorMappingInterceptor
from shared_kernel.settings import GrpcServerSettings
from shared_kernel.telemetry import context_from_headers

logger = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """Starts a server span per call, continuing the caller's W3C trace context from metadata."""

    def __init__(self) -> None:
        self._tracer = trace.get_tracer("tessera.grpc")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """Wrap unary-unary handlers in a span; other kinds pass through untouched."""
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method
        if method.startswith(("/grpc.health.", "/grpc.reflection.")):
            return handler
        inner: Callable[..., Any] = handler.unary_unary
        tracer = self._tracer

        async def traced(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            headers = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
            token = otel_context.attach(context_from_headers(headers))
            try:
                with tracer.start_as_current_span(
                    method,
                    kind=trace.SpanKind.SERVER,
                    attributes={"rpc.system": "grpc", "rpc.method": method},
                ):
                    return await inner(request, context)
            finally:
                otel_context.detach(token)

        return grpc.unary_unary_rpc_method_handler(
            traced,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class GrpcServer:
    """A grpc.aio server with health, reflection, error mapping and graceful shutdown."""

    def __init__(
        self,
        settings: GrpcServerSettings,
        service_names: Sequence[str],
        interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.settings = settings
        self.service_names = list(service_names)
        self.health = health_aio.HealthServicer()
        max_bytes = settings.grpc_max_message_bytes
        self.server = grpc.aio.server(
            interceptors=[TracingInterceptor(), ErrorMappingInterceptor(), *interceptors],
            options=[
                ("grpc.max_receive_message_length", max_bytes),
                ("grpc.max_send_message_length", max_bytes),
                ("grpc.so_reuseport", 1),
                *options,
            ],
        )
        self.port = 0

    def add(self, register: Callable[[Any, grpc.aio.Server], None], servicer: object) -> None:
        """Register a servicer with its generated `add_*_to_server` function."""
        register(servicer, self.server)

    async def start(self) -> int:
        """Bind, start serving and return the bound port. Health starts as NOT_SERVING."""
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.settings.grpc_reflection:
            reflection.enable_server_reflection(
                [
                    *self.service_names,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                ],
                self.server,
            )
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"could not bind {address}")
        await self.set_serving(False)
        await self.server.start()
        logger.info("gRPC server listening", extra={"address": f"{self.settings.grpc_host}:{self.port}"})
        return self.port

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING or NOT_SERVING for the overall server and every service it hosts."""
        status = SERVING if serving else NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def stop(self) -> None:
        """Report NOT_SERVING, let in-flight calls finish within the grace period, then stop."""
        await self.health.enter_graceful_shutdown()
        started = time.monotonic()
        await self.server.stop(self.settings.grpc_shutdown_grace_s)
        logger.info("gRPC server stopped", extra={"drain_s": round(time.monotonic() - started, 3)})


async def wait_for_shutdown_signal(extra: Iterable[asyncio.Future[Any]] = ()) -> None:
    """Block until SIGTERM or SIGINT arrives (or one of `extra` finishes)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait([waiter, *extra], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not waiter and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        waiter.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
