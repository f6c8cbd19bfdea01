"""gRPC server lifecycle shared by the write and read services.

create → add servicers → start (health + reflection) → serve until SIGTERM/SIGINT →
health NOT_SERVING → drain in-flight calls for a grace period → stop.

Every server enforces the limits in its settings (message sizes, concurrent calls,
keepalive policy, connection age), listens with TLS or mutual TLS when configured, and
authenticates calls when it is given an authenticator.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from contextvars import Token
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from opentelemetry import context as otel_context
from opentelemetry import trace

from shared_kernel.contracts.trace_context import context_from_headers
from shared_kernel.platform.grpc_errors import (
    ErrorMappingInterceptor,
    UndecodableRequest,
    handle_error,
    reject_undecodable,
    tolerant_deserializer,
)
from shared_kernel.platform.interceptors import Behaviour, Handler, HandlerInterceptor, rewrap
from shared_kernel.platform.metrics import metrics_enabled
from shared_kernel.platform.rpc_metrics import RpcRecorder, status_of
from shared_kernel.platform.security import tls
from shared_kernel.platform.security.authn import Authenticator, reset_principal, set_principal
from shared_kernel.platform.security.interceptor import AuthInterceptor, Refusal, check_call
from shared_kernel.platform.security.scopes import required_scope
from shared_kernel.platform.settings import GrpcServerSettings
from shared_kernel.platform.telemetry import records_spans

logger = logging.getLogger(__name__)

_NO_PARENT = otel_context.Context()

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ServerCallInterceptor(HandlerInterceptor):
    """What the server does around every call, in one interceptor: metrics, span, error mapping, auth.

    A unary-unary call (nearly all traffic) runs in one wrapper that does, from the outside in,
    what the separate interceptors do: the RPC metrics (when this process collects them; they
    see the status the caller gets), the server span, the error mapping
    (ErrorMappingInterceptor, so refusals and failures inside the span are mapped, never
    INTERNAL by accident) and authentication (AuthInterceptor, whose refusals are traced and
    mapped). The wrapper is built once per method and reused while the resolved handler is the
    same object: per call there is one interceptor step and one wrapper frame, instead of one
    of each per layer plus a method handler built by every layer. Health and reflection get no
    span and no metrics, as before. Other kinds of handlers (streams) go through
    AuthInterceptor inside ErrorMappingInterceptor, as separate interceptors would take them.

    With `root_spans=False`, a call without a trace context gets no span when the process
    records none (telemetry.records_spans): such a span would only carry fresh ids that
    nothing reads. A call with a trace context still runs in its span, so its logs carry the
    caller's trace. The write service keeps root spans: its spans' ids travel on in events.
    """

    reuse_unary = True

    def __init__(
        self,
        authenticator: Authenticator | None = None,
        recorder: RpcRecorder | None = None,
        *,
        root_spans: bool = True,
        trailing_metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__()
        self._authenticator = authenticator
        self._recorder = recorder
        self._root_spans = root_spans
        # Set on every observed unary call before its handler runs (a replica's name, for one).
        self._trailer = tuple(trailing_metadata)
        self._tracer = trace.get_tracer("tessera.grpc")
        self._auth = None if authenticator is None else AuthInterceptor(authenticator)
        self._errors = ErrorMappingInterceptor()

    def wrap(self, handler: Handler, details: grpc.HandlerCallDetails) -> Handler:
        """The resolved handler, wrapped (see the class docstring)."""
        if handler.unary_unary is not None:
            return self._wrap_unary(handler, handler.unary_unary, details.method)
        if self._auth is not None:
            handler = self._auth.wrap(handler, details)
        return self._errors.wrap(handler, details)

    def _wrap_unary(self, handler: Handler, inner: Behaviour, method: str) -> Handler:
        observed = not method.startswith(_UNOBSERVED)
        recorder = self._recorder if observed else None
        tracer = self._tracer if observed else None
        # Decided once per method: tracing is configured before the server starts.
        root_spans = self._root_spans or records_spans()
        trailer = self._trailer if observed else ()
        authenticator = self._authenticator
        required = None if authenticator is None else required_scope(method)
        # Built once per method (the SDK copies them into each span).
        attributes = {"rpc.system": "grpc", "rpc.method": method}

        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            error: BaseException | None = None
            try:
                if tracer is None:
                    return await _mapped(request, context)
                parent = _NO_PARENT
                # Most calls carry no trace context: then the span is a root, without parsing anything.
                metadata = context.invocation_metadata() or ()
                for key, _ in metadata:
                    if key == "traceparent":
                        parent = context_from_headers({k: v for k, v in metadata if isinstance(v, str)})
                        break
                else:
                    if not root_spans:
                        return await _mapped(request, context)
                with tracer.start_as_current_span(
                    method, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes
                ):
                    return await _mapped(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                if recorder is not None:
                    recorder.record(method, status_of(context, error), time.perf_counter() - started)

        async def _mapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            principal: Token[str] | None = None
            if trailer:
                context.set_trailing_metadata(trailer)
            try:
                if isinstance(request, UndecodableRequest):
                    await reject_undecodable(request, context)
                if required is not None:
                    assert authenticator is not None
                    verdict = check_call(authenticator, method, required, context.invocation_metadata())
                    if isinstance(verdict, Refusal):
                        await verdict.abort(context)
                    else:
                        principal = set_principal(verdict.principal)
                return await inner(request, context)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                await handle_error(exc, method, context)
            finally:
                if principal is not None:
                    reset_principal(principal)

        return rewrap(
            handler,
            lambda _inner, _kind: call,
            request_deserializer=tolerant_deserializer(handler.request_deserializer, method),
        )


_UNOBSERVED = ("/grpc.health.", "/grpc.reflection.")


class _Registrations:
    """Stands in for a server while a generated `add_*_to_server` function hands over its handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, _handlers: object) -> None:
        """Ignored: the method handlers come again through add_registered_method_handlers."""

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Any]) -> None:
        """Keep the service's method handlers."""
        self.service = service
        self.handlers = dict(handlers)


def add_preserialized(
    add: Callable[[Any, Any], None], methods: Collection[str]
) -> Callable[[Any, grpc.aio.Server], None]:
    """A register function like the generated `add`, except that `methods` answer bytes, sent as they are."""

    def register(servicer: Any, server: grpc.aio.Server) -> None:
        registrations = _Registrations()
        add(servicer, registrations)
        handlers = registrations.handlers
        for name in methods:
            handler = handlers[name]
            if handler.unary_unary is None:
                raise ValueError(f"{name} is not a unary method")
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                handler.unary_unary, request_deserializer=handler.request_deserializer, response_serializer=None
            )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(registrations.service, handlers),))
        server.add_registered_method_handlers(registrations.service, handlers)

    return register


def server_options(settings: GrpcServerSettings) -> list[tuple[str, Any]]:
    """gRPC core channel arguments for the limits in `settings`."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
        ("grpc.max_send_message_length", settings.grpc_max_message_bytes),
        # Off unless asked for: with it, a second server on a taken port would silently share it.
        ("grpc.so_reuseport", 1 if settings.grpc_so_reuseport else 0),
        ("grpc.keepalive_time_ms", _ms(settings.grpc_keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _ms(settings.grpc_keepalive_timeout_s)),
        # The server-side name of this argument is "min RECEIVED ping interval": how often clients may ping.
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(settings.grpc_min_client_ping_interval_s)),
        ("grpc.http2.max_ping_strikes", settings.grpc_max_ping_strikes),
        ("grpc.keepalive_permit_without_calls", int(settings.grpc_keepalive_permit_without_calls)),
    ]
    if settings.grpc_max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", _ms(settings.grpc_max_connection_age_s)),
            ("grpc.max_connection_age_grace_ms", _ms(settings.grpc_max_connection_age_grace_s)),
        ]
    return options


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


class GrpcServer:
    """A grpc.aio server with health, reflection, error mapping, limits, TLS, auth and graceful shutdown.

    Without an `authenticator` every call is let through unauthenticated: that is for tests
    that exercise a servicer in-process. The service processes always pass one, built by
    `shared_kernel.platform.security.authn.authenticator_from_settings`.
    """

    def __init__(
        self,
        settings: GrpcServerSettings,
        service_names: Sequence[str],
        interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
        options: Sequence[tuple[str, Any]] = (),
        authenticator: Authenticator | None = None,
        *,
        root_spans: bool = True,
    ) -> None:
        self.settings = settings
        self.service_names = list(service_names)
        self.health = health_aio.HealthServicer()
        # Metrics outermost (only when configured), then the span, the error mapping and auth:
        # refusals are traced and never become INTERNAL; metrics see the status the caller gets.
        interceptors = list(interceptors)
        trailer: tuple[tuple[str, str], ...] = ()
        for interceptor in interceptors:
            # An interceptor that only adds a trailer to unary calls hands it to the one call
            # wrapper instead of wrapping each of them again (read_service.workers).
            offered = getattr(interceptor, "unary_trailing_metadata", None)
            if offered:
                trailer += tuple(offered)
                interceptor.trailer_taken_over = True  # type: ignore[attr-defined]
        calls = ServerCallInterceptor(
            authenticator,
            RpcRecorder() if metrics_enabled() else None,
            root_spans=root_spans,
            trailing_metadata=trailer,
        )
        self.server = grpc.aio.server(
            interceptors=[calls, *interceptors],
            options=[*server_options(settings), *options],
            maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs or None,
        )
        self.authenticated = authenticator is not None
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
        credentials = tls.server_credentials(self.settings)
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            try:
                self.port = self.server.add_secure_port(address, credentials)
            except RuntimeError as exc:
                raise RuntimeError(
                    f"could not bind {address} with TLS: are GRPC_TLS_CERT_FILE and GRPC_TLS_KEY_FILE "
                    "a PEM certificate chain and its matching private key?"
                ) from exc
        if self.port == 0:
            raise RuntimeError(f"could not bind {address}")
        await self.set_serving(False)
        await self.server.start()
        logger.info(
            "gRPC server listening",
            extra={
                "address": f"{self.settings.grpc_host}:{self.port}",
                "transport": tls.describe(self.settings),
                "authentication": self.settings.auth_mode if self.authenticated else "none",
                "reflection": self.settings.grpc_reflection,
                "max_concurrent_rpcs": self.settings.grpc_max_concurrent_rpcs or "unlimited",
            },
        )
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
