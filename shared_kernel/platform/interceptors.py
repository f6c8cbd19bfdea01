"""The one skeleton of a server interceptor: resolve the method's handler, then wrap it.

Every interceptor of the servers (the call wrapper, error mapping, authentication, the read
replica's header) does the same around its own behaviour: ask for the handler, leave an unknown
method alone, and hand back a handler of the same kind (unary or streaming requests and replies)
and serializers whose behaviour wraps the original. `HandlerInterceptor` is that skeleton, a
subclass writes only `wrap`; `rewrap` rebuilds a handler of any kind around new behaviour.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, NamedTuple, TypeAlias

import grpc

# A string: the stubs make RpcMethodHandler generic, the runtime class is not subscriptable.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]]"
# A handler's behaviour: `(request or request iterator, context)` → reply, or an async iterator of replies.
Behaviour: TypeAlias = Callable[..., Any]


class CallKind(NamedTuple):
    """Which sides of a call stream."""

    streams_requests: bool
    streams_replies: bool


_KINDS = (
    ("unary_unary", CallKind(False, False), grpc.unary_unary_rpc_method_handler),
    ("unary_stream", CallKind(False, True), grpc.unary_stream_rpc_method_handler),
    ("stream_unary", CallKind(True, False), grpc.stream_unary_rpc_method_handler),
    ("stream_stream", CallKind(True, True), grpc.stream_stream_rpc_method_handler),
)
_SAME: Any = object()


def rewrap(
    handler: Handler,
    replace: Callable[[Behaviour, CallKind], Behaviour],
    *,
    request_deserializer: Callable[[bytes], Any] | None = _SAME,
) -> Handler:
    """A handler of `handler`'s kind and response serializer whose behaviour is `replace(original, kind)`.

    The request deserializer is kept unless another one is given. A handler of no known kind
    has no behaviour to wrap and is returned as it is.
    """
    deserializer = handler.request_deserializer if request_deserializer is _SAME else request_deserializer
    for attribute, kind, build in _KINDS:
        original = getattr(handler, attribute)
        if original is not None:
            built: Handler = build(
                replace(original, kind),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
            return built
    return handler


class HandlerInterceptor(grpc.aio.ServerInterceptor):
    """Resolves each call's handler and returns `wrap(handler, details)`; unknown methods pass.

    With `reuse_unary`, the wrapped version of a unary-unary handler is built once per method
    and reused while the resolved handler is the same object (nearly all traffic is unary, and a
    new method handler per call costs). Only for interceptors whose unary wrapping depends on
    the method alone, not on the call's metadata.
    """

    reuse_unary: ClassVar[bool] = False

    def __init__(self) -> None:
        # method -> (the unary handler resolved for it, its wrapped version)
        self._reused: dict[str, tuple[Handler, Handler]] = {}

    def wrap(self, handler: Handler, details: grpc.HandlerCallDetails) -> Handler:
        """The handler to run for this call instead of `handler` (`handler` itself to pass it through)."""
        raise NotImplementedError

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        """The resolved handler, wrapped."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if not (self.reuse_unary and handler.unary_unary is not None):
            return self.wrap(handler, handler_call_details)
        method = handler_call_details.method
        cached = self._reused.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrap(handler, handler_call_details)
        self._reused[method] = (handler, wrapped)
        return wrapped
