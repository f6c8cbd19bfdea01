"""Who is calling: the authenticated principal of the current gRPC call.

The authentication interceptor sets it for the duration of each call; anything that
records an audit trail reads it with `current_principal()`.
"""

from __future__ import annotations

from contextvars import ContextVar, Token

ANONYMOUS = "anonymous"

_principal: ContextVar[str] = ContextVar("tessera_principal", default=ANONYMOUS)


def current_principal() -> str:
    """The principal (token subject) of the call being handled, or "anonymous"."""
    return _principal.get()


def set_principal(principal: str) -> Token[str]:
    """Bind `principal` to the current call; pass the token to `reset_principal` afterwards."""
    return _principal.set(principal)


def reset_principal(token: Token[str]) -> None:
    """Undo a `set_principal`."""
    _principal.reset(token)
