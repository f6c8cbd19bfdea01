"""Queries against a paused Redis: bounded by the caller's deadline and by QUERY_TIMEOUT_S.

A paused (SIGSTOP) Redis accepts connections and never answers, the worst case for a
client: nothing fails, everything waits. The replica's socket timeout is left at its 5 s
default, so an answer in about 1 s can only come from the query budget.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Mapping
from typing import Any

import grpc
import pytest

from tessera.users.v1 import user_command_service_pb2 as cmd
from tessera.users.v1 import user_command_service_pb2_grpc as cmd_grpc
from tessera.users.v1 import user_query_service_pb2 as qry
from tessera.users.v1 import user_query_service_pb2_grpc as qry_grpc

from .conftest import HostileStack
from .matrix import VALID_PASSWORD
from .test_bad_input_matrix import eventually

QUERY_TIMEOUT_S = 1.0
SERVER_DEADLINE_TEXT = "the caller's deadline passed"
SERVER_TIMEOUT_TEXT = f"did not answer within {QUERY_TIMEOUT_S:g} s"


@pytest.fixture(scope="module")
def stack_env() -> Mapping[str, str]:
    """A short query budget; the Redis socket timeout keeps its 5 s default.

    No near cache: these are queries that must read Redis (a near-cache hit makes no Redis call).
    """
    return {"QUERY_TIMEOUT_S": str(QUERY_TIMEOUT_S), "NEAR_CACHE_SIZE": "0"}


@pytest.fixture(scope="module")
def stack_shape() -> dict[str, Any]:
    """One relay and one replica are enough here."""
    return {"relays": 1, "read_ports": (0,)}


async def timed(call: Any) -> tuple[str, str, float]:
    """Status name, details and seconds taken by one call."""
    started = time.monotonic()
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code().name, error.details() or "", time.monotonic() - started
    return "OK", "", time.monotonic() - started


async def test_queries_against_a_paused_redis(hostile: HostileStack) -> None:
    commands = cmd_grpc.UserCommandServiceStub(hostile.write)
    queries = qry_grpc.UserQueryServiceStub(hostile.read)
    tag = secrets.token_hex(4)
    users = []
    for name in ("ada", "bob", "cy"):
        reply = await commands.RegisterUser(
            cmd.RegisterUserRequest(
                email=f"{name}.{tag}@example.com", username=f"{name}_{tag}", password=VALID_PASSWORD, full_name=name
            ),
            timeout=10,
        )
        users.append((reply.user_id, f"{name}.{tag}@example.com"))
    for user_id, _ in users:
        await eventually(lambda: queries.GetUser(qry.GetUserRequest(user_id=user_id), timeout=5))  # noqa: B023
    ada, bob = users[0][0], users[1][0]

    hostile.redis.pause()
    try:
        # The caller's deadline is the tighter bound (clearly: gRPC rounds the timeout it sends,
        # so one equal to QUERY_TIMEOUT_S may arrive a hair above it): DEADLINE_EXCEEDED, answered
        # by the replica a little ahead of the caller's own timer, so its reason arrives. Twenty
        # at once: a lagging event loop may let the caller's timer win now and then, never every time.
        caller_timeout_s = QUERY_TIMEOUT_S * 0.6
        short = await asyncio.gather(
            *(timed(queries.GetUser(qry.GetUserRequest(user_id=ada), timeout=caller_timeout_s)) for _ in range(20))
        )
        assert {code for code, _, _ in short} == {"DEADLINE_EXCEEDED"}, short
        assert all(elapsed < caller_timeout_s + 0.5 for _, _, elapsed in short), short
        assert any(SERVER_DEADLINE_TEXT in details for _, details, _ in short), short

        # No deadline, or a generous one: QUERY_TIMEOUT_S bounds the wait, answered UNAVAILABLE
        # (another replica may answer), long before the 5 s Redis socket timeout.
        long = await asyncio.gather(
            timed(queries.GetUser(qry.GetUserRequest(user_id=ada))),
            timed(queries.GetUser(qry.GetUserRequest(user_id=bob), timeout=30)),
            timed(queries.GetUserByEmail(qry.GetUserByEmailRequest(email=users[2][1]))),
            timed(queries.ListUsers(qry.ListUsersRequest(page_size=10))),
            timed(queries.ListUsers(qry.ListUsersRequest(search="no such user", page_size=100), timeout=30)),
        )
        for code, details, elapsed in long:
            assert code == "UNAVAILABLE", long
            assert SERVER_TIMEOUT_TEXT in details, long
            assert QUERY_TIMEOUT_S * 0.9 <= elapsed < QUERY_TIMEOUT_S + 1.5, long

        # A deadline already too close to start is refused without waiting at all.
        code, details, elapsed = await timed(queries.GetUser(qry.GetUserRequest(user_id=ada), timeout=0.01))
        assert code == "DEADLINE_EXCEEDED", (code, details)
        assert elapsed < 0.5
    finally:
        hostile.redis.resume()

    # Calls abandoned mid-flight must not leave a reply behind on a pooled connection: every
    # answer after the pause belongs to its own question.
    for _ in range(5):
        for user_id, email in users:
            view = (await queries.GetUser(qry.GetUserRequest(user_id=user_id), timeout=5)).user
            assert view.user_id == user_id
            by_email = (await queries.GetUserByEmail(qry.GetUserByEmailRequest(email=email), timeout=5)).user
            assert by_email.user_id == user_id
    page = await queries.ListUsers(qry.ListUsersRequest(search=tag, page_size=10), timeout=5)
    assert sorted(u.user_id for u in page.users) == sorted(user_id for user_id, _ in users)

    await hostile.assert_healthy()
    log = hostile.stack.readers[0].log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
    assert "GetUser gave up" in log
