"""Issuer tokens: RS256, ES256 and EdDSA against a JWKS served by the test, with claim checks,
cached refresh on rotation, and the refusals that stop algorithm confusion."""

from __future__ import annotations

import base64
import hashlib
import hmac as hmac_module
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from shared_kernel.platform.security.authn import authenticator_from_settings
from shared_kernel.platform.security.jwks import DispatchingVerifier, JwksError, JwksVerifier, jwks_loader, parse_jwks
from shared_kernel.platform.security.tokens import TokenError, TokenSigner, TokenVerifier
from shared_kernel.platform.settings import AuthSettings

ISSUER = "https://issuer.test"
AUDIENCE = "tessera"
HMAC_KEY = b"h" * 32


class Issuer:
    """Keys made in the test, published as a JWKS; mints tokens like an organisation's issuer."""

    def __init__(self) -> None:
        self.keys: dict[str, tuple[str, Any]] = {}

    def add(self, kid: str, algorithm: str) -> None:
        private = {
            "RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
            "EdDSA": ed25519.Ed25519PrivateKey.generate,
        }[algorithm]()
        self.keys[kid] = (algorithm, private)

    def jwks(self) -> bytes:
        entries = []
        for kid, (algorithm, private) in self.keys.items():
            tool: Any = {"RS256": RSAAlgorithm, "ES256": ECAlgorithm, "EdDSA": OKPAlgorithm}[algorithm]
            entry = json.loads(tool.to_jwk(private.public_key()))
            entries.append(entry | {"kid": kid, "use": "sig", "alg": algorithm})
        return json.dumps({"keys": entries}).encode()

    def mint(self, kid: str, *, alg: str | None = None, **claims: Any) -> str:
        algorithm, private = self.keys[kid]
        now = int(time.time())
        body = {"sub": "svc-orders", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300} | claims
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, private, algorithm=alg or algorithm, headers={"kid": kid})


@pytest.fixture
def issuer() -> Issuer:
    made = Issuer()
    made.add("rsa-1", "RS256")
    made.add("ec-1", "ES256")
    made.add("ed-1", "EdDSA")
    return made


@pytest.fixture
def jwks_url(issuer: Issuer) -> Iterator[str]:
    """The issuer's JWKS over HTTP, served by the test."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = issuer.jwks()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/.well-known/jwks.json"
    finally:
        server.shutdown()
        server.server_close()


def verifier(url: str, **kwargs: Any) -> JwksVerifier:
    return JwksVerifier(jwks_loader(url), issuer=ISSUER, audience=AUDIENCE, leeway_s=5, **kwargs)


@pytest.mark.parametrize("kid", ["rsa-1", "ec-1", "ed-1"])
def test_each_algorithm_verifies_with_scopes(issuer: Issuer, jwks_url: str, kid: str) -> None:
    claims = verifier(jwks_url).verify(issuer.mint(kid, scope="orders:read orders:write"))
    assert claims.sub == "svc-orders"
    assert claims.scopes == {"orders:read", "orders:write"}
    assert claims.iss == ISSUER and claims.aud == AUDIENCE


# Times are offsets from the moment the test runs (not from collection: a long run would
# otherwise turn "in two minutes" into the past).
NOW = object()


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"iss": "https://other.test"}, "wrong issuer"),
        ({"aud": "someone-else"}, "wrong audience"),
        ({"exp": (NOW, -60)}, "expired"),
        ({"exp": None}, "required claim"),
        ({"sub": None}, "required claim"),
        ({"nbf": (NOW, 120)}, "not yet valid"),
        ({"iat": (NOW, 120)}, "not yet valid|issued in the future"),
    ],
)
def test_claims_are_checked(issuer: Issuer, jwks_url: str, claims: dict[str, Any], reason: str) -> None:
    now = int(time.time())
    resolved = {
        name: now + value[1] if isinstance(value, tuple) and value[0] is NOW else value
        for name, value in claims.items()
    }
    with pytest.raises(TokenError, match=reason):
        verifier(jwks_url).verify(issuer.mint("ec-1", **resolved))


def test_clock_skew_is_allowed_up_to_the_leeway(issuer: Issuer, jwks_url: str) -> None:
    token = issuer.mint("ed-1", exp=int(time.time()) - 2)
    assert verifier(jwks_url).verify(token).sub == "svc-orders"


def test_a_forged_signature_is_refused(issuer: Issuer, jwks_url: str) -> None:
    check = verifier(jwks_url)
    stranger = Issuer()
    stranger.add("rsa-1", "RS256")  # same kid, another key
    with pytest.raises(TokenError, match="bad signature"):
        check.verify(stranger.mint("rsa-1"))


def _unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part(header)}.{part(claims)}."


def test_alg_none_is_refused(issuer: Issuer, jwks_url: str) -> None:
    token = _unsigned({"alg": "none", "kid": "rsa-1"}, {"sub": "x", "iss": ISSUER, "aud": AUDIENCE, "exp": 2**40})
    with pytest.raises(TokenError, match="unsupported token algorithm"):
        verifier(jwks_url).verify(token)
    with pytest.raises(TokenError):
        DispatchingVerifier(TokenVerifier([HMAC_KEY]), verifier(jwks_url)).verify(token)


def test_hs256_signed_with_the_public_key_is_refused(issuer: Issuer, jwks_url: str) -> None:
    """The classic confusion: the RSA public key (which everyone has) used as an HMAC secret."""
    public_pem = (
        issuer.keys["rsa-1"][1]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    now = int(time.time())
    body = {"sub": "attacker", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 60}
    header = {"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}
    signing_input = f"{_unsigned(header, body)[:-1]}".encode()
    signature = base64.urlsafe_b64encode(hmac_module.new(public_pem, signing_input, hashlib.sha256).digest())
    token = signing_input.decode() + "." + signature.rstrip(b"=").decode()
    with pytest.raises(TokenError, match="unsupported token algorithm"):
        verifier(jwks_url).verify(token)
    # With the development HMAC verifier beside it, the token goes there and fails its key.
    with pytest.raises(TokenError, match="bad signature"):
        DispatchingVerifier(TokenVerifier([HMAC_KEY]), verifier(jwks_url)).verify(token)


def test_an_algorithm_that_does_not_match_the_key_is_refused(issuer: Issuer, jwks_url: str) -> None:
    """An EC key's kid on a token that says RS256 (signed with an RSA key under that kid)."""
    rogue = Issuer()
    rogue.add("ec-1", "RS256")
    with pytest.raises(TokenError, match="does not match its key"):
        verifier(jwks_url).verify(rogue.mint("ec-1"))


def test_hs256_development_tokens_still_work_beside_the_jwks(issuer: Issuer, jwks_url: str) -> None:
    hmac_token = TokenSigner(HMAC_KEY).mint("dev", ["users:read"], 60)
    both = DispatchingVerifier(TokenVerifier([HMAC_KEY]), verifier(jwks_url))
    assert both.verify(hmac_token).sub == "dev"
    assert both.verify(issuer.mint("rsa-1")).sub == "svc-orders"
    only_jwks = DispatchingVerifier(None, verifier(jwks_url))
    with pytest.raises(TokenError, match="unsupported"):
        only_jwks.verify(hmac_token)


def test_a_rotated_key_is_fetched_once_and_a_withdrawn_one_stops_working(issuer: Issuer, jwks_url: str) -> None:
    check = verifier(jwks_url, min_refresh_s=0)
    old = issuer.mint("rsa-1")
    assert check.verify(old).sub == "svc-orders"
    issuer.add("rsa-2", "RS256")
    new = issuer.mint("rsa-2")
    with pytest.raises(TokenError, match="unknown key"):
        check.verify(new)  # refused while the background refresh runs
    deadline = time.monotonic() + 10
    while "rsa-2" not in check.key_ids:
        assert time.monotonic() < deadline, "the key set was not refreshed"
        time.sleep(0.01)
    assert check.verify(new).sub == "svc-orders"
    del issuer.keys["rsa-1"]
    assert check.refresh()
    with pytest.raises(TokenError, match="unknown key"):
        check.verify(old)  # remembered as verified before, forgotten with its key


def test_a_jwks_from_a_file_and_the_settings(issuer: Issuer, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "jwks.json"
    path.write_bytes(issuer.jwks())
    monkeypatch.delenv("AUTH_SIGNING_KEY", raising=False)
    settings = AuthSettings(auth_mode="required", auth_jwks=str(path), auth_issuer=ISSUER, auth_audience=AUDIENCE)
    identity = authenticator_from_settings(settings).authenticate(
        [("authorization", f"Bearer {issuer.mint('ed-1', scopes=['users:read'])}")]
    )
    assert identity.principal == "svc-orders" and identity.scopes == {"users:read"}


def test_key_sets_without_usable_keys_are_refused() -> None:
    with pytest.raises(JwksError):
        parse_jwks(b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}')
    with pytest.raises(JwksError):
        parse_jwks(b"not json")
