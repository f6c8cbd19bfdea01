"""The client with tokens from an organisation's issuer, against a stack that verifies them with
its JWKS (AUTH_JWKS): keys made in the test, the token in a file the client re-reads."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from devstack.supervisor import Stack
from tessera_client import FileToken, PermissionDenied, TesseraClient, Unauthenticated
from tests.e2e.conftest import e2e_config, running_stack

pytestmark = pytest.mark.e2e

ISSUER_KEY = ec.generate_private_key(ec.SECP256R1())


def issue(scopes: list[str]) -> str:
    now = int(time.time())
    claims = {"sub": "svc-checkout", "scope": " ".join(scopes), "iat": now, "exp": now + 600}
    return jwt.encode(claims, ISSUER_KEY, algorithm="ES256", headers={"kid": "issuer-1"})


@pytest.fixture(scope="module")
async def issuer_stack(
    e2e_database: str, redis_server_url: str, e2e_prefix: str, e2e_logs: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    jwks = tmp_path_factory.mktemp("issuer") / "jwks.json"
    public = json.loads(ECAlgorithm.to_jwk(ISSUER_KEY.public_key())) | {"kid": "issuer-1", "use": "sig"}
    jwks.write_text(json.dumps({"keys": [public]}))
    config = e2e_config(e2e_database, redis_server_url, e2e_prefix, e2e_logs, auth=True)
    config.env = {**config.env, "AUTH_JWKS": str(jwks)}
    async with running_stack(config, redis_server_url) as running:
        yield running


async def test_issuer_tokens_authenticate_and_scopes_apply(issuer_stack: Stack, tmp_path: Path, unique: str) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(issue(["users:read", "users:write"]))
    stack = issuer_stack
    async with TesseraClient(stack.write_address, stack.read_addresses, token=FileToken(token_file)) as client:
        user = await client.users.register_user(
            email=f"i{unique}@example.com", username=f"i{unique}", password="correct horse battery", full_name="I"
        )
        assert (await client.users.get_user(user_id=user.user_id)).user.user_id == user.user_id
        token_file.write_text(issue(["users:read"]))  # the issuer narrowed this service's rights
        with pytest.raises(PermissionDenied):
            await client.users.update_user_profile(user_id=user.user_id, full_name="No", bio="", avatar_url="")
        assert (await client.users.get_user(user_id=user.user_id)).user.user_id == user.user_id
    async with TesseraClient(stack.write_address, stack.read_addresses) as anonymous:
        with pytest.raises(Unauthenticated):
            await anonymous.users.get_user(user_id=user.user_id)
