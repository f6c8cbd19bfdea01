"""Canaries: planted passwords, tokens and e-mail addresses must not leak where they do not belong.

One stack runs with auth on, LOG_LEVEL=DEBUG and spans printed to the process logs
(OTEL_TRACES_EXPORTER=console). After traffic that succeeds, fails validation, collides
on an e-mail address and is refused by auth, every place the system writes is searched:

- passwords and tokens: nowhere (process logs and spans, every Postgres table, every Redis
  key and value);
- e-mail addresses: only where they belong (events in the `outbox_event` table, the users table, the
  command-log summary, the Redis views), never in logs or spans; an address sent only in
  a refused call, or only looked up, appears nowhere.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis

from devstack.supervisor import Stack, StackConfig
from tessera.users.v1 import user_command_service_pb2 as cmd
from tessera.users.v1 import user_command_service_pb2_grpc as cmd_grpc
from tessera.users.v1 import user_query_service_pb2 as qry
from tessera.users.v1 import user_query_service_pb2_grpc as qry_grpc
from tests.e2e.conftest import FAST_HASHING, running_stack

pytestmark = pytest.mark.e2e

RUN = secrets.token_hex(4)
PASSWORD_OK = f"CanaryPass-{RUN}-registered"
PASSWORD_DUPLICATE = f"CanaryPass-{RUN}-duplicate"
PASSWORD_INVALID = f"CanaryPass-{RUN}-invalid"
PASSWORD_REFUSED = f"CanaryPass-{RUN}-refused"
PASSWORDS = [PASSWORD_OK, PASSWORD_DUPLICATE, PASSWORD_INVALID, PASSWORD_REFUSED]

EMAIL = f"canary.{RUN}@example.com"  # registered: belongs in events, views and the command log
EMAIL_REFUSED = f"refused.{RUN}@example.com"  # only ever sent with a token lacking the scope
EMAIL_LOOKED_UP = f"lookup.{RUN}@example.com"  # only ever looked up (NOT_FOUND)
FORGED_TOKEN = f"canarytoken{RUN}.e30.c2lnbmF0dXJl"


@dataclass
class Evidence:
    """Everything the system wrote, gathered after the stack stopped (so spans were flushed)."""

    logs: dict[str, str] = field(default_factory=dict)
    tables: dict[str, str] = field(default_factory=dict)
    redis: str = ""
    tokens: list[str] = field(default_factory=list)

    def places(self) -> dict[str, str]:
        """Every searchable place by name."""
        return {
            **{f"log {name}": text for name, text in self.logs.items()},
            **{f"table {name}": text for name, text in self.tables.items()},
            "redis": self.redis,
        }


def _found_in(places: dict[str, str], needle: str) -> list[str]:
    lowered = needle.lower()
    return sorted(name for name, text in places.items() if lowered in text.lower())


async def _drive_traffic(stack: Stack, tokens: list[str]) -> None:
    """Successes, validation failures, a duplicate, auth refusals, lookups; waits until replicas caught up."""
    write_token = stack.mint_token(["users:write"], sub="canary-writer")
    read_token = stack.mint_token(["users:read"], sub="canary-reader")
    tokens += [write_token, read_token, FORGED_TOKEN]
    writer = [("authorization", f"Bearer {write_token}")]
    reader = [("authorization", f"Bearer {read_token}")]

    async with grpc.aio.insecure_channel(stack.write_address) as write_channel:
        commands = cmd_grpc.UserCommandServiceStub(write_channel)

        async def expect(call: Any, code: grpc.StatusCode) -> None:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == code, caught.value.details()

        registered = await commands.RegisterUser(
            cmd.RegisterUserRequest(email=EMAIL, username=f"canary_{RUN}", password=PASSWORD_OK, full_name="Can Ary"),
            metadata=writer,
            timeout=10,
        )
        await expect(
            commands.RegisterUser(
                cmd.RegisterUserRequest(
                    email=EMAIL.upper(), username=f"other_{RUN}", password=PASSWORD_DUPLICATE, full_name="Dup"
                ),
                metadata=writer,
                timeout=10,
            ),
            grpc.StatusCode.ALREADY_EXISTS,
        )
        await expect(
            commands.RegisterUser(
                cmd.RegisterUserRequest(email=EMAIL, username="x", password=PASSWORD_INVALID, full_name="\x00"),
                metadata=writer,
                timeout=10,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        refused = cmd.RegisterUserRequest(
            email=EMAIL_REFUSED, username=f"refused_{RUN}", password=PASSWORD_REFUSED, full_name="No Scope"
        )
        await expect(commands.RegisterUser(refused, metadata=reader, timeout=10), grpc.StatusCode.PERMISSION_DENIED)
        await expect(commands.RegisterUser(refused, timeout=10), grpc.StatusCode.UNAUTHENTICATED)
        forged = [("authorization", f"Bearer {FORGED_TOKEN}")]
        await expect(commands.RegisterUser(refused, metadata=forged, timeout=10), grpc.StatusCode.UNAUTHENTICATED)

        await commands.UpdateUserProfile(
            cmd.UpdateUserProfileRequest(user_id=registered.user_id, full_name="Can Ary II", bio="canary bio"),
            metadata=writer,
            timeout=10,
        )
        await expect(
            commands.UpdateUserProfile(
                cmd.UpdateUserProfileRequest(user_id="00000000-0000-4000-8000-000000000000", full_name="Nobody"),
                metadata=writer,
                timeout=10,
            ),
            grpc.StatusCode.NOT_FOUND,
        )
        await commands.DeactivateUser(
            cmd.DeactivateUserRequest(user_id=registered.user_id, reason="canary"), metadata=writer, timeout=10
        )
        await expect(
            commands.DeactivateUser(
                cmd.DeactivateUserRequest(user_id=registered.user_id, reason="again"), metadata=writer, timeout=10
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
        )

    for address in stack.read_addresses:
        async with grpc.aio.insecure_channel(address) as read_channel:
            queries = qry_grpc.UserQueryServiceStub(read_channel)
            deadline = time.monotonic() + 15
            while True:
                try:
                    found = await queries.GetUserByEmail(
                        qry.GetUserByEmailRequest(email=EMAIL), metadata=reader, timeout=10
                    )
                    if not found.user.active:
                        break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.NOT_FOUND:
                        raise
                assert time.monotonic() < deadline, "the replica never showed the deactivation"
                await asyncio.sleep(0.05)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await queries.GetUserByEmail(qry.GetUserByEmailRequest(email=EMAIL_LOOKED_UP), metadata=reader)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            listed = await queries.ListUsers(qry.ListUsersRequest(search="canary"), metadata=reader, timeout=10)
            assert [user.email for user in listed.users] == [EMAIL]


async def _dump_tables(database_url: str) -> dict[str, str]:
    """Every row of every table, as text; bytea columns also decoded, so protobuf payloads are searchable."""
    connection = await asyncpg.connect(database_url)
    try:
        tables = await connection.fetch(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
        )
        dumps: dict[str, str] = {}
        for table in tables:
            name = table["table_name"]
            rows = await connection.fetch(f'SELECT t::text AS line, t AS record FROM "{name}" AS t')
            parts = [row["line"] for row in rows]
            for row in rows:
                parts += [bytes(v).decode("utf-8", "replace") for v in row["record"] if isinstance(v, bytes)]
            dumps[name] = "\n".join(parts)
        return dumps
    finally:
        await connection.close()


async def _dump_redis(url: str, prefix: str) -> str:
    """Every key under the prefix and every value it holds, whatever its type."""
    # Values decoded loosely: protobuf views hold text fields between binary framing.
    client = aioredis.Redis.from_url(url)
    parts: list[Any] = []
    try:
        async for key in client.scan_iter(match=f"{prefix}*", count=1000):
            parts.append(key)
            kind = _text(await client.type(key))
            if kind == "string":
                parts.append(await client.get(key))
            elif kind == "hash":
                for k, v in (await client.hgetall(key)).items():
                    parts += [k, v]
            elif kind == "zset":
                parts += await client.zrange(key, 0, -1)
            elif kind == "list":
                parts += await client.lrange(key, 0, -1)
            elif kind == "set":
                parts += list(await client.smembers(key))
            elif kind == "stream":
                for _, fields in await client.xrange(key) or []:
                    for k, v in (fields or {}).items():
                        parts += [k, v]
            else:
                raise AssertionError(f"unexpected Redis type {kind} at {key!r}")
    finally:
        await client.aclose()
    return "\n".join(_text(part) for part in parts)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


@pytest.fixture(scope="module")
async def evidence(
    e2e_database: str, redis_server_url: str, e2e_prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Evidence]:
    """Run the traffic on a DEBUG, console-traced, auth-on stack, stop it, and gather what it wrote."""
    log_dir: Path = tmp_path_factory.mktemp("canary-logs")
    config = StackConfig(
        database_url=e2e_database,
        redis_url=redis_server_url,
        redis_key_prefix=e2e_prefix,
        log_dir=log_dir,
        migrate=False,
        auth=True,
        env={**FAST_HASHING, "LOG_LEVEL": "DEBUG", "OTEL_TRACES_EXPORTER": "console"},
    )
    gathered = Evidence()
    async with running_stack(config, redis_server_url) as stack:
        await _drive_traffic(stack, gathered.tokens)
        # A graceful stop flushes each process's batched spans into its log.
        await stack.stop_async()
        gathered.logs = {path.name: path.read_text(errors="replace") for path in sorted(log_dir.glob("*.log"))}
        gathered.tables = await _dump_tables(e2e_database)
        gathered.redis = await _dump_redis(redis_server_url, e2e_prefix)
    yield gathered


def test_the_search_is_not_vacuous(evidence: Evidence) -> None:
    write_log = evidence.logs["write.log"]
    assert " DEBUG " in write_log, "the services did not log at DEBUG"
    assert '"name": "/tessera.users.v1.UserCommandService/RegisterUser"' in write_log, "no spans in the log"
    assert any('"name": "/tessera.users.v1.UserQueryService/' in evidence.logs[n] for n in evidence.logs)
    places = evidence.places()
    assert "table outbox_event" in _found_in(places, EMAIL)
    assert "redis" in _found_in(places, EMAIL)
    assert EMAIL in evidence.tables["command_log"]
    assert "call refused" in write_log


@pytest.mark.parametrize("password", PASSWORDS)
def test_passwords_appear_nowhere(evidence: Evidence, password: str) -> None:
    assert _found_in(evidence.places(), password) == []


def test_tokens_appear_nowhere(evidence: Evidence) -> None:
    places = evidence.places()
    for token in evidence.tokens:
        assert _found_in(places, token) == [], token
        signature = token.rsplit(".", 1)[-1]
        assert _found_in(places, signature) == [], f"the signature of {token}"


def test_emails_appear_only_where_they_belong(evidence: Evidence) -> None:
    allowed = {"table outbox_event", "table users", "table command_log", "redis"}
    found = _found_in(evidence.places(), EMAIL)
    assert set(found) <= allowed, f"{EMAIL} leaked into {sorted(set(found) - allowed)}"


@pytest.mark.parametrize("email", [EMAIL_REFUSED, EMAIL_LOOKED_UP])
def test_emails_of_refused_calls_and_lookups_appear_nowhere(evidence: Evidence, email: str) -> None:
    assert _found_in(evidence.places(), email) == []
