"""The dev stack's side of auth: the signing key it keeps, the tokens it mints, what `up` prints."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from devstack.__main__ import usage_text
from devstack.supervisor import (
    ALL_SCOPES,
    SIGNING_KEY_FILE,
    ServiceError,
    ServiceProcess,
    Stack,
    StackConfig,
    load_or_create_signing_key,
)
from shared_kernel.platform.security.tokens import TokenVerifier


def test_the_signing_key_is_made_once_and_private(tmp_path: Path):
    path = tmp_path / "stack" / SIGNING_KEY_FILE
    key = load_or_create_signing_key(path)
    assert len(key.encode()) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_signing_key(path) == key
    path.write_text("short\n")
    with pytest.raises(ServiceError, match="shorter than 32 bytes"):
        load_or_create_signing_key(path)


def test_without_auth_services_run_insecure_and_calls_carry_no_token():
    stack = Stack(StackConfig(database_url="postgresql://x/y", redis_url="redis://x"))
    assert stack.service_env()["AUTH_MODE"] == "insecure"
    assert "AUTH_SIGNING_KEY" not in stack.service_env()
    assert stack.auth_metadata() == []
    with pytest.raises(ServiceError, match="without authentication"):
        stack.mint_token()


def test_with_auth_services_get_the_key_and_tokens_verify_with_it(tmp_path: Path):
    stack = Stack(StackConfig(auth=True, data_dir=tmp_path))
    env = stack.service_env()
    assert env["AUTH_MODE"] == "required"
    assert env["AUTH_SIGNING_KEY"] == (tmp_path / SIGNING_KEY_FILE).read_text().strip()
    [(name, value)] = stack.auth_metadata(["users:read"], sub="tester")
    assert name == "authorization"
    claims = TokenVerifier([env["AUTH_SIGNING_KEY"].encode()]).verify(value.removeprefix("Bearer "))
    assert (claims.sub, claims.scopes) == ("tester", frozenset({"users:read"}))
    # config.env still wins, so a test can override anything.
    overridden = Stack(StackConfig(auth=True, env={"AUTH_MODE": "insecure"}))
    assert overridden.service_env()["AUTH_MODE"] == "insecure"


def test_an_explicit_key_is_used_as_is_and_checked():
    stack = Stack(StackConfig(auth=True, signing_key="e" * 40))
    assert stack.signing_key == "e" * 40
    assert stack.signing_key_path is None
    with pytest.raises(ServiceError, match="at least 32 bytes"):
        _ = Stack(StackConfig(auth=True, signing_key="short")).signing_key


def test_up_prints_an_export_line_and_grpcurl_calls_with_the_header(tmp_path: Path):
    stack = Stack(StackConfig(auth=True, data_dir=tmp_path))
    stack.write = ServiceProcess("write", ["true"], grpc_port=50051, log_path=tmp_path / "w.log")
    stack.readers = [ServiceProcess("read-1", ["true"], grpc_port=50052, log_path=tmp_path / "r.log")]
    text = usage_text(stack)
    match = re.search(r"^  export TOKEN=(\S+)$", text, re.MULTILINE)
    assert match, text
    claims = TokenVerifier([stack.signing_key.encode()]).verify(match[1])
    assert claims.scopes == set(ALL_SCOPES)
    assert claims.exp - claims.iat >= 7 * 24 * 3600
    assert '-H "authorization: Bearer $TOKEN" ' in text
    assert "shared_kernel.platform.security.tokens" in text
    assert stack.signing_key not in text  # the key itself is never printed

    insecure = Stack(StackConfig(auth=False))
    insecure.write, insecure.readers = stack.write, stack.readers
    text = usage_text(insecure)
    assert "auth     OFF" in text
    assert "TOKEN" not in text
