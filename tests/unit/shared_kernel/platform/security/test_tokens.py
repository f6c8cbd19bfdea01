"""Bearer tokens: signing, verification, expiry, tampering, rotation, and the mint CLI."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from shared_kernel.platform.security import tokens
from shared_kernel.platform.security.tokens import Claims, TokenError, TokenSigner, TokenVerifier

ROOT = Path(__file__).resolve().parents[5]
KEY = b"k" * 32
OTHER_KEY = b"o" * 32
NOW = 1_700_000_000


def signer(key: bytes = KEY, **kwargs: str) -> TokenSigner:
    return TokenSigner(key, clock=lambda: NOW, **kwargs)


def verifier(keys: list[bytes] | None = None, now: float = NOW, **kwargs: str) -> TokenVerifier:
    return TokenVerifier(keys or [KEY], clock=lambda: now, leeway_s=30, **kwargs)


def refused(token: str, check: TokenVerifier | None = None) -> str:
    with pytest.raises(TokenError) as caught:
        (check or verifier()).verify(token)
    return caught.value.reason


def b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_a_minted_token_verifies_to_its_claims():
    token = signer().mint("alice", ["users:write", "users:read"], ttl_s=60)
    assert verifier().verify(token) == Claims(
        sub="alice", scopes=frozenset({"users:read", "users:write"}), iat=NOW, exp=NOW + 60
    )


def test_the_token_is_a_compact_hs256_jwt():
    header, payload, signature = signer().mint("alice", ["users:read"], ttl_s=60).split(".")
    assert json.loads(base64.urlsafe_b64decode(header + "==")) == {"alg": "HS256", "typ": "JWT"}
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    assert claims == {"sub": "alice", "scopes": ["users:read"], "iat": NOW, "exp": NOW + 60}
    assert len(base64.urlsafe_b64decode(signature + "=")) == 32


def test_the_signature_agrees_with_the_rfc_7515_hs256_example():
    # RFC 7515 appendix A.1: a JWS by another implementation. Its signature checks out here;
    # the token is then refused only because it has no `sub` claim.
    key = base64.urlsafe_b64decode(
        "AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow=="
    )
    token = (
        "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9"
        ".eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ"
        ".dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    )
    assert refused(token, verifier([key], now=1300819300)) == "token has no valid sub claim"
    assert refused(token, verifier([OTHER_KEY], now=1300819300)) == "bad signature"


def test_expiry_with_leeway():
    token = signer().mint("alice", [], ttl_s=60)
    assert verifier(now=NOW + 60 + 29).verify(token).sub == "alice"
    assert refused(token, verifier(now=NOW + 60 + 30)) == "token expired"


def test_a_token_issued_in_the_future_is_refused():
    token = TokenSigner(KEY, clock=lambda: NOW + 3600).mint("alice", [], ttl_s=60)
    assert refused(token) == "token issued in the future"


def test_tampered_claims_are_refused():
    token = signer().mint("alice", ["users:read"], ttl_s=60)
    header, _, signature = token.split(".")
    forged = b64({"sub": "alice", "scopes": ["users:read", "admin"], "iat": NOW, "exp": NOW + 60})
    assert refused(f"{header}.{forged}.{signature}") == "bad signature"


def test_another_key_is_refused_and_a_rotated_key_still_verifies():
    old = signer(OTHER_KEY).mint("alice", [], ttl_s=60)
    assert refused(old) == "bad signature"
    assert verifier([KEY, OTHER_KEY]).verify(old).sub == "alice"


@pytest.mark.parametrize(
    "header",
    [{"alg": "none", "typ": "JWT"}, {"alg": "HS512", "typ": "JWT"}, {"alg": "HS256", "typ": "JWE"}, {"typ": "JWT"}],
)
def test_only_hs256_jwts_are_accepted(header):
    token = signer().mint("alice", [], ttl_s=60)
    _, payload, signature = token.split(".")
    assert refused(f"{b64(header)}.{payload}.{signature}").startswith("unsupported token type")
    assert refused(f"{b64(header)}.{payload}.") == refused(f"{b64(header)}.{payload}.{signature}")


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b", "a.b.c.d", "!!!.e30.e30", "é.e30.e30", "x" * 5000, "e30.e30.e30"],
)
def test_malformed_tokens_are_refused(token):
    assert refused(token) in {"malformed token", "unsupported token type (only HS256 JWTs are accepted)"}


def test_one_token_has_one_spelling():
    token = signer().mint("alice", [], ttl_s=60)
    # The last character of a 32-byte signature carries 4 unused bits; setting one changes the
    # string but not the decoded bytes, and must not yield a second valid token.
    last = token[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    sibling = alphabet[alphabet.index(last) ^ 1]
    assert refused(token[:-1] + sibling) in {"malformed token", "bad signature"}


def test_issuer_and_audience_are_checked_when_configured():
    token = signer(issuer="tessera-auth", audience="tessera").mint("alice", [], ttl_s=60)
    assert verifier(issuer="tessera-auth", audience="tessera").verify(token).aud == "tessera"
    assert refused(token, verifier(issuer="someone-else")) == "token has the wrong issuer"
    assert refused(token, verifier(audience="other")) == "token has the wrong audience"
    plain = signer().mint("alice", [], ttl_s=60)
    assert refused(plain, verifier(issuer="tessera-auth")) == "token has the wrong issuer"


def _signed(claims: dict[str, object]) -> str:
    header = b64({"alg": "HS256", "typ": "JWT"})
    payload = b64(claims)
    signature = tokens._signature(KEY, f"{header}.{payload}".encode())
    return f"{header}.{payload}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


def test_an_oauth_style_scope_string_is_understood():
    token = _signed({"sub": "svc", "scope": "users:read users:write", "iat": NOW, "exp": NOW + 60})
    assert verifier().verify(token).scopes == {"users:read", "users:write"}


@pytest.mark.parametrize(
    "claims",
    [
        {"scopes": [], "iat": NOW, "exp": NOW + 60},
        {"sub": "", "scopes": [], "iat": NOW, "exp": NOW + 60},
        {"sub": "a\nb", "scopes": [], "iat": NOW, "exp": NOW + 60},
        {"sub": "a", "scopes": "users:read", "iat": NOW, "exp": NOW + 60},
        {"sub": "a", "scopes": ["bad scope"], "iat": NOW, "exp": NOW + 60},
        {"sub": "a", "scopes": [], "iat": NOW},
        {"sub": "a", "scopes": [], "iat": True, "exp": NOW + 60},
        {"sub": "a", "scopes": [], "iat": NOW, "exp": NOW},
        {"sub": "a", "scopes": [], "iat": NOW, "exp": NOW + 60, "nbf": NOW + 3600},
    ],
)
def test_invalid_claims_are_refused(claims):
    assert refused(_signed(claims))


def test_minting_checks_its_input():
    with pytest.raises(ValueError, match="ttl"):
        signer().mint("alice", [], ttl_s=0)
    with pytest.raises(ValueError, match="sub"):
        signer().mint("", [], ttl_s=60)
    with pytest.raises(ValueError, match="scope"):
        signer().mint("alice", ["users read"], ttl_s=60)


def test_the_cli_mints_a_token_the_verifier_accepts(monkeypatch, capsys):
    monkeypatch.setenv("AUTH_SIGNING_KEY", KEY.decode())
    assert tokens.main(["mint", "--sub", "alice", "--scopes", "users:read,users:write", "--ttl", "120"]) == 0
    token = capsys.readouterr().out.strip()
    claims = TokenVerifier([KEY]).verify(token)
    assert (claims.sub, claims.scopes, claims.exp - claims.iat) == (
        "alice",
        frozenset({"users:read", "users:write"}),
        120,
    )


def test_the_cli_refuses_without_a_key_or_with_a_short_one(monkeypatch, capsys):
    monkeypatch.delenv("AUTH_SIGNING_KEY", raising=False)
    assert tokens.main(["mint", "--sub", "alice"]) == 2
    assert "AUTH_SIGNING_KEY is not set" in capsys.readouterr().err
    monkeypatch.setenv("AUTH_SIGNING_KEY", "short-and-secret")
    assert tokens.main(["mint", "--sub", "alice"]) == 2
    err = capsys.readouterr().err
    assert "at least 32 bytes" in err
    assert "short-and-secret" not in err  # a rejected secret is not echoed


def test_python_dash_m_mints_and_verifies():
    env = {"AUTH_SIGNING_KEY": KEY.decode(), "PATH": "/usr/bin:/bin"}
    argv = [sys.executable, "-m", "shared_kernel.platform.security.tokens"]
    minted = subprocess.run(
        [*argv, "mint", "--sub", "bob", "--scopes", "users:read"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    token = minted.stdout.strip()
    assert minted.stderr == ""
    checked = subprocess.run(
        [*argv, "verify"],
        check=False,
        input=token + "\n",
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["scopes"] == ["users:read"]


def test_a_remembered_token_is_still_refused_once_it_expires() -> None:
    now = [float(NOW)]
    check = TokenVerifier([KEY], clock=lambda: now[0], leeway_s=30)
    token = signer().mint("alice", ["users:read"], ttl_s=60)
    assert check.verify(token).sub == "alice"
    now[0] = NOW + 60 + 29
    assert check.verify(token).sub == "alice"  # within the leeway
    now[0] = NOW + 60 + 30
    assert refused(token, check) == "token expired"
    assert refused(token, check) == "token expired"


def test_a_remembered_token_is_the_same_string_only() -> None:
    check = verifier()
    token = signer().mint("alice", ["users:read"], ttl_s=60)
    check.verify(token)
    header, payload, signature = token.split(".")
    # One character of the signature changed: verified afresh, and refused.
    altered = f"{header}.{payload}.{'A' if signature[0] != 'A' else 'B'}{signature[1:]}"
    assert refused(altered, check) == "bad signature"
    assert refused(altered, check) == "bad signature"
