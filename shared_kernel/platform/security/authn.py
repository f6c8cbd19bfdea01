"""Who is calling: turning a call's metadata into an identity (principal and scopes), and the
principal of the call being handled.

The auth interceptor authenticates each call and binds its principal for the duration of the
call (`set_principal`/`reset_principal`); anything that records an audit trail reads it with
`current_principal()`.

`authenticator_from_settings` is the one place that decides between bearer tokens
(AUTH_MODE=required, the default: from the issuer's JWKS, AUTH_JWKS, and/or HS256 with
AUTH_SIGNING_KEY for development) and no checks at all (AUTH_MODE=insecure, explicit and
loudly logged). Tokens are never logged, not even in part.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Protocol

from shared_kernel.platform.security.jwks import DispatchingVerifier, JwksError, JwksVerifier, jwks_loader
from shared_kernel.platform.security.scopes import ADMIN
from shared_kernel.platform.security.tokens import Claims, TokenError, TokenVerifier
from shared_kernel.platform.settings import AuthSettings

logger = logging.getLogger(__name__)

INSECURE_PRINCIPAL = "insecure-dev"
ANONYMOUS = "anonymous"
REALM = "tessera"

Metadata = Sequence[tuple[str, str | bytes]]


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


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller: the principal recorded in audit trails, and what it may do."""

    principal: str
    scopes: frozenset[str]


class AuthenticationError(Exception):
    """The caller could not be authenticated; maps to UNAUTHENTICATED.

    `error` is the RFC 6750 error code (empty when no credentials were sent at all) and
    `description` a short reason that is safe to return to the caller.
    """

    def __init__(self, description: str, error: str = "invalid_token") -> None:
        super().__init__(description)
        self.description = description
        self.error = error

    def challenge(self) -> str:
        """A WWW-Authenticate value (RFC 6750 §3) describing the failure."""
        if not self.error:
            return f'Bearer realm="{REALM}"'
        return f'Bearer realm="{REALM}", error="{self.error}", error_description="{self.description}"'


class AuthConfigurationError(RuntimeError):
    """The settings do not allow the service to authenticate callers; it must not start."""


class Authenticator(Protocol):
    """Turns a call's metadata into an Identity, or raises AuthenticationError."""

    def authenticate(self, metadata: Metadata) -> Identity:
        """The caller's identity."""
        ...


class Verifier(Protocol):
    """Checks a bearer token: its claims, or TokenError."""

    def verify(self, token: str) -> Claims:
        """The verified claims."""
        ...


class BearerTokenAuthenticator:
    """Accepts `authorization: Bearer <token>` with a token the verifier accepts."""

    def __init__(self, verifier: Verifier) -> None:
        self._verifier = verifier

    def authenticate(self, metadata: Metadata) -> Identity:
        """Verify the single bearer token of the call."""
        values = [value for key, value in metadata if key.lower() == "authorization"]
        if not values:
            raise AuthenticationError("missing bearer token", error="")
        if len(values) > 1:
            raise AuthenticationError("more than one authorization header", error="invalid_request")
        value = values[0]
        if not isinstance(value, str):
            raise AuthenticationError("authorization must be text", error="invalid_request")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError('authorization must be "Bearer <token>"', error="invalid_request")
        try:
            claims = self._verifier.verify(token.strip())
        except TokenError as exc:
            raise AuthenticationError(exc.reason) from None
        return Identity(principal=claims.sub, scopes=claims.scopes)


class InsecureAuthenticator:
    """Trusts everyone, as INSECURE_PRINCIPAL with every scope. Development only."""

    def authenticate(self, metadata: Metadata) -> Identity:
        """The same all-powerful identity for every call, whatever it sends."""
        return Identity(principal=INSECURE_PRINCIPAL, scopes=frozenset({ADMIN}))


def authenticator_from_settings(settings: AuthSettings) -> Authenticator:
    """The authenticator AUTH_MODE asks for; raise AuthConfigurationError when it cannot be built."""
    if settings.auth_mode == "insecure":
        logger.warning(
            "AUTH_MODE=insecure: EVERY CALLER IS TRUSTED WITHOUT A TOKEN and acts as %r. "
            "Never run this outside development; set AUTH_MODE=required and AUTH_SIGNING_KEY.",
            INSECURE_PRINCIPAL,
        )
        return InsecureAuthenticator()
    keys = settings.verification_keys()
    if (settings.auth_signing_key is None or not keys) and settings.auth_jwks is None:
        raise AuthConfigurationError(
            "AUTH_MODE=required (the default) but AUTH_SIGNING_KEY is not set (nor AUTH_JWKS): set AUTH_JWKS to "
            "the issuer's key set, or AUTH_SIGNING_KEY to a random secret of at least 32 bytes for development "
            "(e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`), "
            "or set AUTH_MODE=insecure explicitly for local development"
        )
    hmac_verifier = (
        TokenVerifier(
            keys,
            issuer=settings.auth_issuer,
            audience=settings.auth_audience,
            leeway_s=settings.auth_clock_skew_s,
        )
        if keys
        else None
    )
    jwks_verifier = None
    if settings.auth_jwks is not None:
        try:
            jwks_verifier = JwksVerifier(
                jwks_loader(settings.auth_jwks),
                issuer=settings.auth_issuer,
                audience=settings.auth_audience,
                leeway_s=settings.auth_clock_skew_s,
                refresh_s=settings.auth_jwks_refresh_s,
            )
        except (OSError, JwksError, ValueError) as exc:
            raise AuthConfigurationError(f"AUTH_JWKS could not be loaded: {exc}") from exc
    logger.info(
        "bearer tokens required",
        extra={
            "verification_keys": len(keys),
            "jwks_keys": sorted(jwks_verifier.key_ids) if jwks_verifier is not None else [],
            "issuer": settings.auth_issuer,
            "audience": settings.auth_audience,
        },
    )
    if jwks_verifier is None:
        assert hmac_verifier is not None
        return BearerTokenAuthenticator(hmac_verifier)
    return BearerTokenAuthenticator(DispatchingVerifier(hmac_verifier, jwks_verifier))
