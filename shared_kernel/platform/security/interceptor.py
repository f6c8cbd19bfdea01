"""The server interceptor that authenticates every call and checks its scope.

Health and reflection pass untouched. Any other call is authenticated from its metadata:
no or a bad token is UNAUTHENTICATED, a token without the scope the method needs is
PERMISSION_DENIED naming that scope (both with a `www-authenticate` trailer in the style of
RFC 6750). An accepted call runs with its principal bound (`authn.set_principal`),
for unary and streaming handlers alike, and unbound when it ends.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from shared_kernel.platform.interceptors import Behaviour, CallKind, Handler, HandlerInterceptor, rewrap
from shared_kernel.platform.security.authn import (
    REALM,
    AuthenticationError,
    Authenticator,
    Identity,
    reset_principal,
    set_principal,
)
from shared_kernel.platform.security.scopes import grants, required_scope

logger = logging.getLogger(__name__)


class AuthInterceptor(HandlerInterceptor):
    """Authenticates and authorizes each call (see the module docstring)."""

    def __init__(self, authenticator: Authenticator) -> None:
        super().__init__()
        self._authenticator = authenticator

    def wrap(self, handler: Handler, details: grpc.HandlerCallDetails) -> Handler:
        """Replace the handler with one that refuses or one that binds the principal."""
        method = details.method
        required = required_scope(method)
        if required is None:
            return handler
        verdict = check_call(self._authenticator, method, required, details.invocation_metadata)
        if isinstance(verdict, Refusal):
            return _refusing(handler, verdict.code, verdict.details, verdict.challenge)
        return _as_principal(handler, verdict)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a call is refused: its status code, details and `www-authenticate` challenge."""

    code: grpc.StatusCode
    details: str
    challenge: str

    async def abort(self, context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
        """End the call with this refusal."""
        await context.abort(self.code, self.details, (("www-authenticate", self.challenge),))
        raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


def check_call(
    authenticator: Authenticator, method: str, required: str, metadata: Iterable[Any] | None
) -> Identity | Refusal:
    """The caller's identity when its metadata authenticates it with the `required` scope; else the refusal (logged)."""
    try:
        identity = authenticator.authenticate(tuple(metadata or ()))
    except AuthenticationError as exc:
        logger.info("call refused: %s", exc.description, extra={"rpc_method": method, "grpc_code": "UNAUTHENTICATED"})
        return Refusal(
            grpc.StatusCode.UNAUTHENTICATED, f"{exc.description} (WWW-Authenticate: {exc.challenge()})", exc.challenge()
        )
    if not grants(identity.scopes, required):
        logger.info(
            "call refused: missing scope %s",
            required,
            extra={"rpc_method": method, "principal": identity.principal, "grpc_code": "PERMISSION_DENIED"},
        )
        return Refusal(
            grpc.StatusCode.PERMISSION_DENIED,
            f'the token of {identity.principal!r} lacks the scope "{required}" that {method} needs',
            f'Bearer realm="{REALM}", error="insufficient_scope", scope="{required}"',
        )
    return identity


def _refusing(handler: Handler, code: grpc.StatusCode, details: str, challenge: str) -> Handler:
    """A handler of the same kind as `handler` that fails every call with `code`."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, details, (("www-authenticate", challenge),))

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        # An async generator, like the handlers it stands for: outer interceptors iterate it.
        await refuse(request, context)
        yield  # never reached: abort raises

    return rewrap(handler, lambda _original, kind: refuse_stream if kind.streams_replies else refuse)


def _as_principal(handler: Handler, identity: Identity) -> Handler:
    """`handler` with the caller's principal bound while it runs."""

    def bind(inner: Behaviour, kind: CallKind) -> Behaviour:
        if kind.streams_replies and inspect.isasyncgenfunction(inner):

            async def bound_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                token = set_principal(identity.principal)
                try:
                    async for item in inner(request, context):
                        yield item
                finally:
                    reset_principal(token)

            return bound_stream

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            token = set_principal(identity.principal)
            try:
                return await inner(request, context)
            finally:
                reset_principal(token)

        return unary

    return rewrap(handler, bind)
