"""Which scope each method needs, the authenticators, and the security settings."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from shared_kernel.platform.grpc_server import server_options
from shared_kernel.platform.security.authn import (
    INSECURE_PRINCIPAL,
    AuthConfigurationError,
    AuthenticationError,
    BearerTokenAuthenticator,
    InsecureAuthenticator,
    authenticator_from_settings,
)
from shared_kernel.platform.security.scopes import context_of, grants, required_scope
from shared_kernel.platform.security.tokens import TokenSigner, TokenVerifier
from shared_kernel.platform.settings import AuthSettings, GrpcServerSettings

KEY = "s" * 32


@pytest.mark.parametrize(
    ("method", "scope"),
    [
        ("/tessera.users.v1.UserCommandService/RegisterUser", "users:write"),
        ("/tessera.users.v1.UserQueryService/GetUser", "users:read"),
        ("/tessera.orders.v1.OrderCommandService/PlaceOrder", "orders:write"),
        ("/tessera.orders.v2beta1.OrderQueryService/ListOrders", "orders:read"),
        ("/tessera.users.v1.UserAdminService/RebuildViews", "admin"),
        ("/tessera.ops.v1.ReplayOperatorService/Replay", "admin"),
        ("/tessera.users.v1.UserSomethingService/Do", "admin"),  # unknown kind: fail closed
        ("/unversioned.UserQueryService/Get", "admin"),  # no context: fail closed
        ("/grpc.health.v1.Health/Check", None),
        ("/grpc.health.v1.Health/Watch", None),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", None),
        ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", None),
    ],
)
def test_required_scope(method, scope):
    assert required_scope(method) == scope


def test_context_comes_from_the_versioned_package():
    assert context_of("tessera.users.v1.UserQueryService") == "users"
    assert context_of("acme.billing.v3alpha.InvoiceCommandService") == "billing"
    assert context_of("users.UserQueryService") is None


def test_admin_grants_everything_other_scopes_only_themselves():
    assert grants({"users:read"}, "users:read")
    assert not grants({"users:read"}, "users:write")
    assert not grants({"users:write"}, "users:read")  # write does not imply read
    assert not grants({"users:write"}, "admin")
    assert grants({"admin"}, "users:write")
    assert grants({"admin"}, "orders:read")


def test_bearer_authenticator_reads_one_bearer_header():
    authenticator = BearerTokenAuthenticator(TokenVerifier([KEY.encode()]))
    token = TokenSigner(KEY.encode()).mint("alice", ["users:read"], 60)
    identity = authenticator.authenticate([("user-agent", "x"), ("authorization", f"Bearer {token}")])
    assert (identity.principal, identity.scopes) == ("alice", frozenset({"users:read"}))
    assert authenticator.authenticate([("authorization", f"bearer  {token} ")]).principal == "alice"

    cases: dict[tuple[tuple[str, str | bytes], ...], tuple[str, str]] = {
        (): ("", "missing bearer token"),
        (("authorization", f"Basic {token}"),): ("invalid_request", 'authorization must be "Bearer <token>"'),
        (("authorization", "Bearer "),): ("invalid_request", 'authorization must be "Bearer <token>"'),
        (("authorization", f"Bearer {token}"), ("authorization", f"Bearer {token}")): (
            "invalid_request",
            "more than one authorization header",
        ),
        (("authorization", b"bytes"),): ("invalid_request", "authorization must be text"),
        (("authorization", "Bearer not.a.token"),): ("invalid_token", "malformed token"),
    }
    for metadata, (error, description) in cases.items():
        with pytest.raises(AuthenticationError) as caught:
            authenticator.authenticate(metadata)
        assert (caught.value.error, caught.value.description) == (error, description)
        assert caught.value.challenge().startswith('Bearer realm="tessera"')
        assert token not in caught.value.challenge()


def test_insecure_mode_is_explicit_and_loud(caplog):
    with caplog.at_level(logging.WARNING):
        authenticator = authenticator_from_settings(AuthSettings(auth_mode="insecure"))
    assert isinstance(authenticator, InsecureAuthenticator)
    assert authenticator.authenticate([]).principal == INSECURE_PRINCIPAL
    assert "AUTH_MODE=insecure" in caplog.text
    assert "EVERY CALLER IS TRUSTED" in caplog.text


def test_required_mode_without_a_key_refuses_to_start(monkeypatch):
    monkeypatch.delenv("AUTH_SIGNING_KEY", raising=False)
    monkeypatch.delenv("AUTH_MODE", raising=False)
    with pytest.raises(AuthConfigurationError, match="AUTH_SIGNING_KEY is not set"):
        authenticator_from_settings(AuthSettings())


def test_required_mode_with_keys_verifies_with_both(monkeypatch):
    monkeypatch.setenv("AUTH_SIGNING_KEY", KEY)
    monkeypatch.setenv("AUTH_PREVIOUS_SIGNING_KEY", "p" * 40)
    settings = AuthSettings()
    assert settings.verification_keys() == [KEY.encode(), b"p" * 40]
    authenticator = authenticator_from_settings(settings)
    old_token = TokenSigner(b"p" * 40).mint("old", [], 60)
    assert authenticator.authenticate([("authorization", f"Bearer {old_token}")]).principal == "old"


def test_a_short_key_is_rejected_without_echoing_it(monkeypatch):
    monkeypatch.setenv("AUTH_SIGNING_KEY", "too-short-but-secret")
    with pytest.raises(ValidationError) as caught:
        AuthSettings()
    assert "at least 32 bytes" in str(caught.value)
    assert "too-short-but-secret" not in str(caught.value)


def test_empty_strings_mean_unset(monkeypatch):
    for name in ("AUTH_SIGNING_KEY", "AUTH_PREVIOUS_SIGNING_KEY", "GRPC_TLS_CERT_FILE", "GRPC_TLS_KEY_FILE"):
        monkeypatch.setenv(name, "")
    settings = GrpcServerSettings()
    assert settings.auth_signing_key is None
    assert settings.grpc_tls_cert_file is None


def test_tls_files_go_together(tmp_path: Path):
    pem = tmp_path / "x.pem"
    pem.write_text("-")
    with pytest.raises(ValidationError, match="set together"):
        GrpcServerSettings(grpc_tls_cert_file=pem)
    with pytest.raises(ValidationError, match="mutual TLS"):
        GrpcServerSettings(grpc_tls_client_ca_file=pem)
    with pytest.raises(ValidationError):
        GrpcServerSettings(grpc_tls_cert_file=tmp_path / "missing.pem", grpc_tls_key_file=pem)
    settings = GrpcServerSettings(grpc_tls_cert_file=pem, grpc_tls_key_file=pem, grpc_tls_client_ca_file=pem)
    assert settings.grpc_tls_enabled


def test_server_options_carry_the_limits():
    settings = GrpcServerSettings(
        grpc_max_message_bytes=2048,
        grpc_keepalive_time_s=30,
        grpc_keepalive_timeout_s=5,
        grpc_min_client_ping_interval_s=15,
        grpc_max_ping_strikes=3,
        grpc_keepalive_permit_without_calls=False,
        grpc_max_connection_age_s=120,
        grpc_max_connection_age_grace_s=7.5,
    )
    options = dict(server_options(settings))
    assert options["grpc.max_receive_message_length"] == 2048
    assert options["grpc.max_send_message_length"] == 2048
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.keepalive_timeout_ms"] == 5_000
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 15_000
    assert options["grpc.http2.max_ping_strikes"] == 3
    assert options["grpc.keepalive_permit_without_calls"] == 0
    assert options["grpc.max_connection_age_ms"] == 120_000
    assert options["grpc.max_connection_age_grace_ms"] == 7_500
    unlimited = dict(server_options(GrpcServerSettings(grpc_max_connection_age_s=0)))
    assert "grpc.max_connection_age_ms" not in unlimited


def test_secret_settings_do_not_show_in_their_repr():
    settings = AuthSettings(auth_signing_key=SecretStr(KEY))
    assert KEY not in repr(settings)
    assert KEY not in str(settings.model_dump())
