"""Bearer tokens from an organisation's issuer: asymmetric JWTs checked against its JWKS.

The signature is checked by PyJWT (with `cryptography`), never by code of our own. Accepted
algorithms are RS256, ES256 and EdDSA (Ed25519), and only with a key of the matching type:
the key is picked by the token's `kid` (or is the set's only key), and the algorithm the
token names must be the one that key type implies. So `none`, HS256 (an HMAC "signed" with a
public key: the classic confusion) and any other pairing are refused before a signature is
computed. HS256 stays available as the development mode (shared_kernel.platform.security.tokens);
`DispatchingVerifier` sends an HS256 token to that verifier and every other token here, so
no key ever serves both kinds.

The key set comes from a file or a URL. It is loaded at start (a service that cannot load it
does not start), then refreshed in a background thread when older than `refresh_s`, and at
once (at most every `min_refresh_s`) when a token names a key id the set does not have: an
issuer that rotates publishes its next key before signing with it, so the refresh usually
happens before the first such token arrives. A token with an unknown key id is refused
while that refresh runs; verification never waits for the network. When the set changes,
the tokens remembered as verified are forgotten, so a withdrawn key stops working at once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from shared_kernel.platform.security.tokens import (
    MAX_TOKEN_CHARS,
    VERIFIED_CACHE_SIZE,
    Claims,
    TokenError,
    TokenVerifier,
    _is_int,
    claims_of,
)

logger = logging.getLogger(__name__)

ASYMMETRIC_ALGORITHMS = ("RS256", "ES256", "EdDSA")
_MAX_SUBJECT_CHARS = 256
_FETCH_TIMEOUT_S = 5.0
_MAX_JWKS_BYTES = 1024 * 1024


class JwksError(RuntimeError):
    """The key set could not be loaded or holds no usable key."""


_IMPLIED = {("RSA", "None"): "RS256", ("EC", "P-256"): "ES256", ("OKP", "Ed25519"): "EdDSA"}
_PARSERS: dict[str, Any] = {"RS256": RSAAlgorithm, "ES256": ECAlgorithm, "EdDSA": OKPAlgorithm}


def _algorithm_for(jwk: dict[str, Any]) -> str | None:
    """The one algorithm a key may verify, from its type and curve; None for keys we do not accept."""
    kty, crv = jwk.get("kty"), jwk.get("crv")
    implied = _IMPLIED.get((str(kty), str(crv)))
    declared = jwk.get("alg")
    if implied is None or (declared is not None and declared != implied) or jwk.get("use", "sig") != "sig":
        return None
    return implied


def parse_jwks(document: bytes | str) -> dict[str, tuple[str, Any]]:
    """kid → (algorithm, public key) for every usable signing key of a JWKS document."""
    try:
        data = json.loads(document)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise JwksError("the JWKS is not JSON") from exc
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise JwksError('the JWKS has no "keys" list')
    keys: dict[str, tuple[str, Any]] = {}
    for index, jwk in enumerate(data["keys"]):
        if not isinstance(jwk, dict) or "d" in jwk or "k" in jwk:
            continue  # private or symmetric key material never verifies here
        algorithm = _algorithm_for(jwk)
        if algorithm is None:
            continue
        try:
            key = _PARSERS[algorithm].from_jwk(jwk)
        except (jwt.InvalidKeyError, ValueError, KeyError, TypeError):
            logger.warning("JWKS key %s is malformed; skipped", jwk.get("kid", index))
            continue
        keys[str(jwk.get("kid", f"#{index}"))] = (algorithm, key)
    if not keys:
        raise JwksError("the JWKS holds no RS256, ES256 or EdDSA signing key")
    return keys


def jwks_loader(source: str) -> Callable[[], bytes]:
    """A function reading the JWKS from an http(s) URL or a file path."""
    if source.startswith(("https://", "http://")):

        def fetch() -> bytes:
            request = urllib.request.Request(source, headers={"Accept": "application/json"})  # noqa: S310 - scheme checked
            with urllib.request.urlopen(request, timeout=_FETCH_TIMEOUT_S) as response:  # noqa: S310
                return bytes(response.read(_MAX_JWKS_BYTES + 1))[:_MAX_JWKS_BYTES]

        return fetch
    path = Path(source.removeprefix("file://"))
    return path.read_bytes


# PyJWT's refusals, in the words the HS256 verifier uses for the same ones.
_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidIssuerError, "token has the wrong issuer"),
    (jwt.InvalidAudienceError, "token has the wrong audience"),
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.MissingRequiredClaimError, "token lacks a required claim"),
)


class JwksVerifier:
    """Verifies RS256/ES256/EdDSA tokens against a refreshed JWKS, then their claims."""

    def __init__(
        self,
        load: Callable[[], bytes],
        *,
        issuer: str | None = None,
        audience: str | None = None,
        leeway_s: float = 30.0,
        refresh_s: float = 300.0,
        min_refresh_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._load = load
        self._issuer = issuer
        self._audience = audience
        self._leeway_s = leeway_s
        self._refresh_s = refresh_s
        self._min_refresh_s = min_refresh_s
        self._clock = clock
        self._lock = threading.Lock()
        self._refreshing = False
        self._verified: dict[str, Claims] = {}
        document = load()  # at start: a service without its keys must not start
        self._keys = parse_jwks(document)
        self._document = document
        self._loaded_at = time.monotonic()
        self._tried_at = self._loaded_at

    @property
    def key_ids(self) -> frozenset[str]:
        """The key ids currently trusted."""
        return frozenset(self._keys)

    def refresh(self) -> bool:
        """Load the key set again now; True when it changed. A failed load keeps the current set."""
        self._tried_at = time.monotonic()
        try:
            document = self._load()
            keys = parse_jwks(document)
        except (OSError, JwksError, ValueError) as exc:
            logger.warning("JWKS refresh failed; keeping the current keys", extra={"error": str(exc)})
            return False
        self._loaded_at = time.monotonic()
        changed = document != self._document
        if changed:
            self._keys, self._document = keys, document
            self._verified = {}
            logger.info("JWKS changed", extra={"key_ids": sorted(keys)})
        return changed

    def _refresh_in_background(self, *, urgent: bool) -> None:
        now = time.monotonic()
        due = now - self._loaded_at >= self._refresh_s or (urgent and now - self._tried_at >= self._min_refresh_s)
        with self._lock:
            if not due or self._refreshing:
                return
            self._refreshing = True
            self._tried_at = now

        def run() -> None:
            try:
                self.refresh()
            finally:
                self._refreshing = False

        threading.Thread(target=run, name="jwks-refresh", daemon=True).start()

    def verify(self, token: str) -> Claims:
        """The token's claims, or TokenError saying why it is refused."""
        self._refresh_in_background(urgent=False)
        known = self._verified.get(token)
        if known is not None:
            if self._clock() < known.exp + self._leeway_s:
                return known
            self._verified.pop(token, None)
            raise TokenError("token expired")
        claims = self._verify(token)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            self._verified.pop(next(iter(self._verified)), None)
        self._verified[token] = claims
        return claims

    def _verify(self, token: str) -> Claims:
        if not token or len(token) > MAX_TOKEN_CHARS or not token.isascii():
            raise TokenError("malformed token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise TokenError("malformed token") from None
        algorithm = header.get("alg")
        if algorithm not in ASYMMETRIC_ALGORITHMS:
            raise TokenError(f"unsupported token algorithm (accepted: {', '.join(ASYMMETRIC_ALGORITHMS)})")
        if "crit" in header or header.get("typ", "JWT") not in ("JWT", "at+jwt"):
            raise TokenError("unsupported token type")
        kid = header.get("kid")
        keys = self._keys
        if kid is None and len(keys) == 1:
            kid = next(iter(keys))
        if not isinstance(kid, str) or kid not in keys:
            self._refresh_in_background(urgent=True)
            raise TokenError("token signed with an unknown key")
        key_algorithm, key = keys[kid]
        if algorithm != key_algorithm:
            raise TokenError("token algorithm does not match its key")
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[key_algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway_s,
                options={"require": ["exp", "sub"], "verify_aud": self._audience is not None},
            )
        except jwt.InvalidTokenError as exc:
            reason = next((text for kind, text in _REASONS if isinstance(exc, kind)), "invalid token")
            raise TokenError(reason) from None
        return self._claims(claims)

    def _claims(self, claims: dict[str, Any]) -> Claims:
        sub, exp, iat = claims.get("sub"), claims.get("exp"), claims.get("iat", 0)
        if not isinstance(sub, str) or not sub or len(sub) > _MAX_SUBJECT_CHARS or not sub.isprintable():
            raise TokenError("token has no valid sub claim")
        if not _is_int(exp) or not _is_int(iat):
            raise TokenError("token has no valid exp claim")
        if iat > self._clock() + self._leeway_s:
            raise TokenError("token issued in the future")
        return claims_of(claims, sub, iat, exp, self._audience)


class DispatchingVerifier:
    """HS256 tokens to the development HMAC verifier, asymmetric ones to the JWKS verifier.

    Either may be absent; a token whose algorithm has no verifier is refused.
    """

    def __init__(self, hmac: TokenVerifier | None, jwks: JwksVerifier | None) -> None:
        if hmac is None and jwks is None:
            raise ValueError("no verifier")
        self._hmac = hmac
        self._jwks = jwks

    def verify(self, token: str) -> Claims:
        """Route by the header's `alg`; each verifier checks everything again itself."""
        try:
            algorithm = jwt.get_unverified_header(token).get("alg") if token.count(".") == 2 else None
        except jwt.DecodeError:
            raise TokenError("malformed token") from None
        if algorithm == "HS256" and self._hmac is not None:
            return self._hmac.verify(token)
        if algorithm in ASYMMETRIC_ALGORITHMS and self._jwks is not None:
            return self._jwks.verify(token)
        raise TokenError("unsupported token algorithm")
