"""Property-based fuzzing of every RPC against the real processes.

Whatever a caller sends, the answer is a status that names a caller's mistake or a real
outcome: never UNKNOWN, never INTERNAL, never UNAVAILABLE or DEADLINE_EXCEEDED (a bad
request must not make a service slow or sick), and the processes stay alive and SERVING.

HOSTILE_FUZZ_EXAMPLES (default 150) sets the examples per RPC; a longer run:

    HOSTILE_FUZZ_EXAMPLES=5000 make test PYTEST_ARGS='tests/hostile/test_fuzz.py'
"""

from __future__ import annotations

import os
import secrets
import string
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera.users.v1 import user_command_service_pb2 as cmd
from tessera.users.v1 import user_command_service_pb2_grpc as cmd_grpc
from tessera.users.v1 import user_query_service_pb2 as qry
from tessera.users.v1 import user_query_service_pb2_grpc as qry_grpc

from .conftest import HostileStack
from .matrix import COMMANDS, HEALTH, QUERIES, UNKNOWN_ID, VALID_PASSWORD

EXAMPLES = int(os.environ.get("HOSTILE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # latency is asserted through the call timeout instead
    database=None,  # nothing written into the working tree
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
CALL_TIMEOUT_S = 10.0

# Statuses a request, however bad, may legitimately get from each RPC.
ALLOWED: dict[str, set[str]] = {
    "RegisterUser": {"OK", "INVALID_ARGUMENT", "ALREADY_EXISTS"},
    "UpdateUserProfile": {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION"},
    "DeactivateUser": {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION"},
    "GetUser": {"OK", "INVALID_ARGUMENT", "NOT_FOUND"},
    "GetUserByEmail": {"OK", "INVALID_ARGUMENT", "NOT_FOUND"},
    "ListUsers": {"OK", "INVALID_ARGUMENT"},
    "Check": {"OK", "INVALID_ARGUMENT", "NOT_FOUND"},
}

# --- strategies -------------------------------------------------------------------------

# Every code point but surrogates (a str holding one cannot be encoded as UTF-8), so
# control characters, NUL, U+2028 and non-characters are all in.
any_char = st.characters(exclude_categories=["Cs"])
EDGE_TEXT = [
    "",
    " ",
    "*",
    "?",
    "[",
    "]",
    "{",
    "}",
    "[a-z]*",
    "{tag}",
    "\r\n",
    "\x00",
    "\u2028",
    "\ufeff",
    "' OR 1=1 --",
    "'; DROP TABLE users;--",
    "users:view:*",
    "%s%n",
    "../../etc/passwd",
    UNKNOWN_ID,
    UNKNOWN_ID.upper(),
    "{" + UNKNOWN_ID + "}",
]
huge_text = st.builds(lambda ch, n: ch * n, any_char, st.integers(min_value=200, max_value=20_000))
text = st.one_of(
    st.text(any_char, max_size=40),
    st.sampled_from(EDGE_TEXT),
    huge_text,
    st.uuids().map(str),
    st.emails(),
    st.text(string.printable, max_size=300),
)
int32_edges = st.sampled_from([0, 1, -1, 20, 100, 101, 2**31 - 1, -(2**31), 2**15, -(2**15)])
int32 = st.one_of(int32_edges, st.integers(min_value=-(2**31), max_value=2**31 - 1))
enum_value = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 99, -1, 2**31 - 1, -(2**31)]), int32)
body = st.one_of(st.binary(max_size=64), st.binary(min_size=64, max_size=4096))


@dataclass
class Targets:
    """Channels to the services and a few real users to aim at."""

    write: grpc.Channel
    reads: list[grpc.Channel]
    user_ids: list[str]
    emails: list[str]
    page_tokens: list[str]

    def read(self, index: int) -> grpc.Channel:
        """One of the replicas."""
        return self.reads[index % len(self.reads)]


@pytest.fixture(scope="module")
def targets(hostile: HostileStack) -> Iterator[Targets]:
    """Synchronous channels (hypothesis drives plain functions) and some real users."""
    write = grpc.insecure_channel(hostile.stack.write_address)
    reads = [grpc.insecure_channel(address) for address in hostile.stack.read_addresses]
    try:
        commands = cmd_grpc.UserCommandServiceStub(write)
        tag = secrets.token_hex(3)
        user_ids, emails = [], []
        for n in range(5):
            email = f"fuzz{n}.{tag}@example.com"
            reply = commands.RegisterUser(
                cmd.RegisterUserRequest(
                    email=email, username=f"fuzz{n}_{tag}", password=VALID_PASSWORD, full_name=f"Fuzz {n}"
                ),
                timeout=CALL_TIMEOUT_S,
            )
            user_ids.append(reply.user_id)
            emails.append(email)
        for channel in reads:
            wait_visible(qry_grpc.UserQueryServiceStub(channel), user_ids)
        queries = qry_grpc.UserQueryServiceStub(reads[0])
        tokens = []
        for sort in (0, 2, 3):
            request = qry.ListUsersRequest(page_size=1, sort_by=qry.UserSortField.ValueType(sort))
            page = queries.ListUsers(request, timeout=CALL_TIMEOUT_S)
            if page.next_page_token:
                tokens.append(page.next_page_token)
        assert len(tokens) == 3
        yield Targets(write, reads, user_ids, emails, tokens)
    finally:
        write.close()
        for channel in reads:
            channel.close()


def wait_visible(queries: qry_grpc.UserQueryServiceStub, user_ids: list[str], within: float = 15.0) -> None:
    """Block until a replica shows every one of `user_ids` (the views are eventually consistent)."""
    deadline = time.monotonic() + within
    for user_id in user_ids:
        while status_of(lambda: queries.GetUser(qry.GetUserRequest(user_id=user_id), timeout=5))[0] != "OK":  # noqa: B023
            assert time.monotonic() < deadline, f"user {user_id} never became visible"
            time.sleep(0.02)


def status_of(call: Callable[[], Any]) -> tuple[str, str]:
    """Run one call; its status name and details."""
    try:
        call()
    except grpc.RpcError as error:
        return error.code().name, error.details() or ""
    return "OK", ""


def check(rpc: str, request: Message | bytes, outcome: tuple[str, str]) -> None:
    """The outcome is one `rpc` may give; the request is shown when it is not."""
    code, details = outcome
    shown = request if isinstance(request, bytes) else str(request)[:500]
    assert code in ALLOWED[rpc], f"{rpc} answered {code} ({details!r}) to {shown!r}"


def raw_call(channel: grpc.Channel, method: str, payload: bytes) -> tuple[str, str]:
    """Send bytes as they are."""
    send: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
    return status_of(lambda: send(payload, timeout=CALL_TIMEOUT_S))


def mutate_token(token: str, index: int, char: str) -> str:
    """`token` with one character replaced (or appended)."""
    position = index % (len(token) + 1)
    return token[:position] + char + token[position + 1 :]


# --- commands ---------------------------------------------------------------------------


@FUZZ
@given(
    email=text,
    username=text,
    password=text,
    full_name=text,
    correlation=st.none() | st.text(string.printable.strip(), max_size=200),
)
def test_register_user(
    targets: Targets, email: str, username: str, password: str, full_name: str, correlation: str | None
) -> None:
    request = cmd.RegisterUserRequest(email=email, username=username, password=password, full_name=full_name)
    metadata = (("x-correlation-id", correlation),) if correlation else None
    stub = cmd_grpc.UserCommandServiceStub(targets.write)
    check(
        "RegisterUser",
        request,
        status_of(lambda: stub.RegisterUser(request, timeout=CALL_TIMEOUT_S, metadata=metadata)),
    )


@FUZZ
@given(pick=st.integers(0, 4), real=st.booleans(), user_id=text, full_name=text, bio=text, avatar_url=text)
def test_update_user_profile(
    targets: Targets, pick: int, real: bool, user_id: str, full_name: str, bio: str, avatar_url: str
) -> None:
    target = targets.user_ids[pick] if real else user_id
    request = cmd.UpdateUserProfileRequest(user_id=target, full_name=full_name, bio=bio, avatar_url=avatar_url)
    stub = cmd_grpc.UserCommandServiceStub(targets.write)
    check("UpdateUserProfile", request, status_of(lambda: stub.UpdateUserProfile(request, timeout=CALL_TIMEOUT_S)))


@FUZZ
@given(pick=st.integers(0, 4), real=st.booleans(), user_id=text, reason=text)
def test_deactivate_user(targets: Targets, pick: int, real: bool, user_id: str, reason: str) -> None:
    # Real users are registered fresh now and then, so deactivation keeps meeting active ones.
    target = (targets.user_ids[pick] if pick else _fresh_user(targets)) if real else user_id
    request = cmd.DeactivateUserRequest(user_id=target, reason=reason)
    stub = cmd_grpc.UserCommandServiceStub(targets.write)
    check("DeactivateUser", request, status_of(lambda: stub.DeactivateUser(request, timeout=CALL_TIMEOUT_S)))


def _fresh_user(targets: Targets) -> str:
    tag = secrets.token_hex(4)
    reply = cmd_grpc.UserCommandServiceStub(targets.write).RegisterUser(
        cmd.RegisterUserRequest(
            email=f"f.{tag}@example.com", username=f"f_{tag}", password=VALID_PASSWORD, full_name="F"
        ),
        timeout=CALL_TIMEOUT_S,
    )
    return str(reply.user_id)


# --- queries ----------------------------------------------------------------------------


@FUZZ
@given(replica=st.integers(0, 1), real=st.sampled_from([None, 0, 1, 2]), user_id=text)
def test_get_user(targets: Targets, replica: int, real: int | None, user_id: str) -> None:
    request = qry.GetUserRequest(user_id=user_id if real is None else targets.user_ids[real])
    stub = qry_grpc.UserQueryServiceStub(targets.read(replica))
    check("GetUser", request, status_of(lambda: stub.GetUser(request, timeout=CALL_TIMEOUT_S)))


@FUZZ
@given(replica=st.integers(0, 1), real=st.sampled_from([None, 0, 1]), email=text, upper=st.booleans())
def test_get_user_by_email(targets: Targets, replica: int, real: int | None, email: str, upper: bool) -> None:
    address = email if real is None else targets.emails[real]
    request = qry.GetUserByEmailRequest(email=address.upper() if upper else address)
    stub = qry_grpc.UserQueryServiceStub(targets.read(replica))
    check("GetUserByEmail", request, status_of(lambda: stub.GetUserByEmail(request, timeout=CALL_TIMEOUT_S)))


@FUZZ
@given(
    replica=st.integers(0, 1),
    page_size=int32,
    active=enum_value,
    search=text,
    sort_by=enum_value,
    sort_direction=enum_value,
    token=st.one_of(
        text, st.tuples(st.integers(0, 2), st.integers(0, 500), st.sampled_from("AB_-=+/.~\x00é")), st.integers(0, 2)
    ),
)
def test_list_users(
    targets: Targets,
    replica: int,
    page_size: int,
    active: int,
    search: str,
    sort_by: int,
    sort_direction: int,
    token: Any,
) -> None:
    if isinstance(token, tuple):  # a genuine token with one character changed
        which, index, char = token
        token = mutate_token(targets.page_tokens[which % len(targets.page_tokens)], index, char)
    elif isinstance(token, int):  # a genuine token, possibly reused with another query
        token = targets.page_tokens[token % len(targets.page_tokens)]
    request = qry.ListUsersRequest(
        page_size=page_size,
        # Open enums: any int32 goes on the wire, as a client built from another schema may send.
        active=qry.ActiveFilter.ValueType(active),
        search=search,
        sort_by=qry.UserSortField.ValueType(sort_by),
        sort_direction=qry.SortDirection.ValueType(sort_direction),
        page_token=token,
    )
    stub = qry_grpc.UserQueryServiceStub(targets.read(replica))
    check("ListUsers", request, status_of(lambda: stub.ListUsers(request, timeout=CALL_TIMEOUT_S)))


@FUZZ
@given(server=st.integers(0, 2), service=text)
def test_health_check(targets: Targets, server: int, service: str) -> None:
    channel = targets.write if server == 0 else targets.read(server)
    request = health_pb2.HealthCheckRequest(service=service)
    stub = health_pb2_grpc.HealthStub(channel)
    check("Check", request, status_of(lambda: stub.Check(request, timeout=CALL_TIMEOUT_S)))


# --- raw bodies ---------------------------------------------------------------------------

RAW_METHODS = [
    ("write", COMMANDS + "RegisterUser"),
    ("write", COMMANDS + "UpdateUserProfile"),
    ("write", COMMANDS + "DeactivateUser"),
    ("read", QUERIES + "GetUser"),
    ("read", QUERIES + "GetUserByEmail"),
    ("read", QUERIES + "ListUsers"),
    ("read", HEALTH),
    ("write", HEALTH),
]


@FUZZ
@given(target=st.sampled_from(RAW_METHODS), payload=body)
def test_random_bodies(targets: Targets, target: tuple[str, str], payload: bytes) -> None:
    server, method = target
    channel = targets.write if server == "write" else targets.read(len(payload))
    check(method.rsplit("/", 1)[-1], payload, raw_call(channel, method, payload))


# --- afterwards -------------------------------------------------------------------------


async def test_every_process_survived(hostile: HostileStack, targets: Targets) -> None:
    await hostile.assert_healthy()
    for name, log in hostile.service_logs().items():
        assert "Traceback" not in log, f"{name} logged a traceback:\n{log[-3000:]}"
        assert "unhandled error" not in log, f"{name} hit a bug:\n{log[-3000:]}"
    # Not merely SERVING: both replicas still answer with the right user.
    for address in hostile.stack.read_addresses:
        stub = qry_grpc.UserQueryServiceStub(hostile.channel(address))
        for user_id in targets.user_ids:
            reply = await stub.GetUser(qry.GetUserRequest(user_id=user_id), timeout=5)
            assert reply.user.user_id == user_id
