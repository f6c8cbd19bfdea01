"""Bearer tokens: HMAC-SHA256 signed, in the compact JWT form (RFC 7519, `alg` HS256).

Written with the standard library only. The claims are `sub` (the principal), `scopes` (a
list of strings), `iat` and `exp` (seconds since the epoch), and optionally `iss` and `aud`.
Verification accepts exactly HS256: a token naming another algorithm (`none` included) is
refused before anything else is read from it.

`python -m shared_kernel.platform.security.tokens mint --sub alice --scopes users:read,users:write --ttl 3600`
prints a token signed with AUTH_SIGNING_KEY; `verify` checks one read from standard input.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

ALGORITHM = "HS256"
# Far above any real token, far below gRPC's metadata limit: a cap on work done per call.
MAX_TOKEN_CHARS = 4096
MAX_TTL_S = 366 * 24 * 3600
_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")
_SCOPE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_MAX_SCOPES = 64
_MAX_SUBJECT_CHARS = 256
# Verified tokens remembered per verifier: callers reuse one token for many calls.
VERIFIED_CACHE_SIZE = 1024


class TokenError(Exception):
    """A token that must not be accepted; `reason` is short and safe to show the caller."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token says about its bearer."""

    sub: str
    scopes: frozenset[str]
    iat: int
    exp: int
    iss: str | None = None
    aud: str | None = None


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not _B64URL.fullmatch(text):
        raise TokenError("malformed token")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise TokenError("malformed token") from exc
    # One token, one spelling: unused trailing bits must be zero, so a token cannot be altered
    # into a different string that still verifies.
    if _b64encode(raw) != text:
        raise TokenError("malformed token")
    return raw


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenError("malformed token") from exc
    if not isinstance(value, dict):
        raise TokenError("malformed token")
    return value


def _signature(key: bytes, signing_input: bytes) -> bytes:
    return hmac.new(key, signing_input, hashlib.sha256).digest()


def validate_scopes(scopes: Iterable[str]) -> frozenset[str]:
    """Check scope names (letters, digits and `_.:-`) and return them as a set."""
    result = frozenset(scopes)
    if len(result) > _MAX_SCOPES:
        raise ValueError(f"at most {_MAX_SCOPES} scopes")
    for scope in result:
        if not _SCOPE.fullmatch(scope):
            raise ValueError(f"invalid scope name {scope!r}")
    return result


class TokenSigner:
    """Mints tokens with one key."""

    def __init__(
        self,
        key: bytes,
        *,
        issuer: str | None = None,
        audience: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not key:
            raise ValueError("empty signing key")
        self._key = key
        self._issuer = issuer
        self._audience = audience
        self._clock = clock

    def mint(self, sub: str, scopes: Iterable[str], ttl_s: int) -> str:
        """A token for `sub` with `scopes`, valid for `ttl_s` seconds from now."""
        if not sub or len(sub) > _MAX_SUBJECT_CHARS or not sub.isprintable():
            raise ValueError(f"sub must be 1 to {_MAX_SUBJECT_CHARS} printable characters")
        if not 0 < ttl_s <= MAX_TTL_S:
            raise ValueError(f"ttl must be between 1 and {MAX_TTL_S} seconds")
        now = int(self._clock())
        claims: dict[str, Any] = {"sub": sub, "scopes": sorted(validate_scopes(scopes)), "iat": now, "exp": now + ttl_s}
        if self._issuer is not None:
            claims["iss"] = self._issuer
        if self._audience is not None:
            claims["aud"] = self._audience
        header = _b64encode(json.dumps({"alg": ALGORITHM, "typ": "JWT"}, separators=(",", ":")).encode())
        payload = _b64encode(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
        signing_input = f"{header}.{payload}"
        return f"{signing_input}.{_b64encode(_signature(self._key, signing_input.encode('ascii')))}"


class TokenVerifier:
    """Checks a token's signature against one or more keys (rotation), then its claims.

    A token that verified is remembered (up to VERIFIED_CACHE_SIZE of them, the oldest forgotten
    first), so the next call with the very same string skips the decoding, the HMAC and the
    claim checks: the answer cannot differ, because the keys are fixed for the verifier's
    life and the claims do not change. Only time does, so a remembered token is still refused
    once it expires (with the same leeway). Refused tokens are not remembered.
    """

    def __init__(
        self,
        keys: Sequence[bytes],
        *,
        issuer: str | None = None,
        audience: str | None = None,
        leeway_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not keys or not all(keys):
            raise ValueError("at least one non-empty verification key is needed")
        self._verified: dict[str, Claims] = {}
        self._keys = list(keys)
        self._issuer = issuer
        self._audience = audience
        self._leeway_s = leeway_s
        self._clock = clock

    def verify(self, token: str) -> Claims:
        """Return the token's claims, or raise TokenError saying why it is refused."""
        known = self._verified.get(token)
        if known is not None:
            if self._clock() < known.exp + self._leeway_s:
                return known
            del self._verified[token]
            raise TokenError("token expired")
        claims = self._verify(token)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = claims
        return claims

    def _verify(self, token: str) -> Claims:
        if not token or len(token) > MAX_TOKEN_CHARS or not token.isascii():
            raise TokenError("malformed token")
        parts = token.split(".")
        if len(parts) != 3:
            raise TokenError("malformed token")
        header_b64, payload_b64, signature_b64 = parts
        header = _json_object(_b64decode(header_b64))
        if header.get("alg") != ALGORITHM or header.get("typ", "JWT") != "JWT" or "crit" in header:
            raise TokenError(f"unsupported token type (only {ALGORITHM} JWTs are accepted)")
        signature = _b64decode(signature_b64)
        signing_input = f"{header_b64}.{payload_b64}".encode("ascii")
        # Every key is tried, even after a match, so timing says nothing about which key signed.
        matches = [hmac.compare_digest(_signature(key, signing_input), signature) for key in self._keys]
        if not any(matches):
            raise TokenError("bad signature")
        return self._check_claims(_json_object(_b64decode(payload_b64)))

    def _check_claims(self, claims: dict[str, Any]) -> Claims:
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > _MAX_SUBJECT_CHARS or not sub.isprintable():
            raise TokenError("token has no valid sub claim")
        iat, exp = claims.get("iat"), claims.get("exp")
        if not _is_int(iat) or not _is_int(exp) or exp <= iat:
            raise TokenError("token has no valid iat and exp claims")
        now = self._clock()
        if now >= exp + self._leeway_s:
            raise TokenError("token expired")
        if iat > now + self._leeway_s:
            raise TokenError("token issued in the future")
        nbf = claims.get("nbf")
        if nbf is not None and (not _is_int(nbf) or now + self._leeway_s < nbf):
            raise TokenError("token not yet valid")
        iss = claims.get("iss")
        if self._issuer is not None and iss != self._issuer:
            raise TokenError("token has the wrong issuer")
        aud = claims.get("aud")
        if self._audience is not None and not _audience_matches(aud, self._audience):
            raise TokenError("token has the wrong audience")
        return claims_of(claims, sub, iat, exp, self._audience)


def claims_of(claims: dict[str, Any], sub: str, iat: int, exp: int, audience: str | None) -> Claims:
    """The Claims of a payload whose `sub`, `iat` and `exp` were checked (`aud`: the one required, if any)."""
    iss, aud = claims.get("iss"), claims.get("aud")
    return Claims(
        sub=sub,
        scopes=_scopes_of(claims),
        iat=iat,
        exp=exp,
        iss=iss if isinstance(iss, str) else None,
        aud=audience if audience is not None else (aud if isinstance(aud, str) else None),
    )


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _audience_matches(aud: object, expected: str) -> bool:
    if isinstance(aud, str):
        return aud == expected
    return isinstance(aud, list) and expected in aud


def _scopes_of(claims: dict[str, Any]) -> frozenset[str]:
    """`scopes` (a list), or the OAuth-style `scope` (space-separated) that other minters write."""
    raw = claims.get("scopes")
    if raw is None and isinstance(claims.get("scope"), str):
        raw = claims["scope"].split()
    if raw is None:
        return frozenset()
    if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
        raise TokenError("token has an invalid scopes claim")
    try:
        return validate_scopes(raw)
    except ValueError as exc:
        raise TokenError("token has an invalid scopes claim") from exc


# --- the command line ----------------------------------------------------------------------


def _parse_scopes(raw: str) -> list[str]:
    return [part.strip() for part in raw.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """`mint` prints a new token; `verify` reads one from stdin and prints its claims."""
    from pydantic import ValidationError

    from shared_kernel.platform.settings import AuthSettings

    parser = argparse.ArgumentParser(prog="python -m shared_kernel.platform.security.tokens", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    mint = commands.add_parser("mint", help="print a token signed with AUTH_SIGNING_KEY")
    mint.add_argument("--sub", required=True, help="the principal the token names")
    mint.add_argument("--scopes", type=_parse_scopes, default=[], help="comma-separated, e.g. users:read,users:write")
    mint.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    commands.add_parser("verify", help="check a token read from standard input; print its claims")
    args = parser.parse_args(argv)

    try:
        settings = AuthSettings()
    except ValidationError as exc:
        print(f"invalid settings: {exc}", file=sys.stderr)
        return 2
    if settings.auth_signing_key is None:
        print("AUTH_SIGNING_KEY is not set", file=sys.stderr)
        return 2
    if args.command == "mint":
        signer = TokenSigner(
            settings.auth_signing_key.get_secret_value().encode(),
            issuer=settings.auth_issuer,
            audience=settings.auth_audience,
        )
        try:
            print(signer.mint(args.sub, args.scopes, args.ttl))
        except ValueError as exc:
            print(f"cannot mint: {exc}", file=sys.stderr)
            return 2
        return 0
    verifier = TokenVerifier(
        settings.verification_keys(),
        issuer=settings.auth_issuer,
        audience=settings.auth_audience,
        leeway_s=settings.auth_clock_skew_s,
    )
    try:
        claims = verifier.verify(sys.stdin.readline().strip())
    except TokenError as exc:
        print(f"refused: {exc.reason}", file=sys.stderr)
        return 1
    print(json.dumps({"sub": claims.sub, "scopes": sorted(claims.scopes), "iat": claims.iat, "exp": claims.exp}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
