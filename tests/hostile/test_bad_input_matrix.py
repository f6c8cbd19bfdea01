"""The bad-input matrix against the real stack (definition in matrix.py, document in
docs/bad-input-matrix.md), and what a command cut off by its deadline leaves behind."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from read_service.page_tokens import PageTokenCodec
from read_service.settings import DEV_PAGE_TOKEN_SECRET
from read_service.views.users import ListUsersQuery
from tessera.users.v1 import user_command_service_pb2 as cmd
from tessera.users.v1 import user_command_service_pb2_grpc as cmd_grpc
from tessera.users.v1 import user_query_service_pb2 as qry
from tessera.users.v1 import user_query_service_pb2_grpc as qry_grpc

from .conftest import WRITE_APPLICATION, HostileStack, PostgresLog, RedisMonitor
from .matrix import CASES, KNOWN_DEFECTS, VALID_PASSWORD, Case, Given
from .render_matrix import REPRODUCE, render

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results" / "bad-input-matrix.json"
DOCUMENT = ROOT / "docs" / "bad-input-matrix.md"
WRITE_DOC_ENV = "TESSERA_WRITE_MATRIX_DOC"


@pytest.fixture(scope="module")
def stack_env() -> Mapping[str, str]:
    """No near cache: the matrix watches which requests reach Redis, and a near-cache hit does not."""
    return {"NEAR_CACHE_SIZE": "0"}


async def call_raw(channel: grpc.aio.Channel, case: Case, body: bytes) -> tuple[str, str]:
    """Send `body` as it is and return the status name and details."""
    # No serializers: bytes in, bytes out.
    method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(case.method)
    try:
        await method(body, timeout=case.timeout, metadata=case.metadata or None)
    except grpc.aio.AioRpcError as error:
        return error.code().name, error.details() or ""
    return "OK", ""


async def eventually(probe: Any, within: float = 15.0) -> Any:
    """Retry an async probe until it stops raising AssertionError or NOT_FOUND."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await probe()
        except (AssertionError, grpc.aio.AioRpcError) as error:
            if isinstance(error, grpc.aio.AioRpcError) and error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.02)


async def given_state(hostile: HostileStack) -> Given:
    """Three users visible on the replica, and page tokens genuine and foreign."""
    commands = cmd_grpc.UserCommandServiceStub(hostile.write)
    queries = qry_grpc.UserQueryServiceStub(hostile.read)
    tag = secrets.token_hex(4)
    ids = []
    for n in range(3):
        reply = await commands.RegisterUser(
            cmd.RegisterUserRequest(
                email=f"given{n}.{tag}@example.com",
                username=f"given{n}_{tag}",
                password=VALID_PASSWORD,
                full_name=f"Given {n}",
            ),
            timeout=10,
        )
        ids.append(reply.user_id)
    for user_id in ids:
        await eventually(lambda: queries.GetUser(qry.GetUserRequest(user_id=user_id), timeout=5))  # noqa: B023
    page = await queries.ListUsers(qry.ListUsersRequest(page_size=1), timeout=5)
    assert page.next_page_token
    foreign = PageTokenCodec(DEV_PAGE_TOKEN_SECRET.encode()).issue(
        ListUsersQuery(page_size=1).binding(), b"00000000000000000000\x00" + ids[0].encode()
    )
    return Given(
        user_id=ids[0], email=f"given0.{tag}@example.com", page_token=page.next_page_token, foreign_token=foreign
    )


async def run_case(hostile: HostileStack, monitor: RedisMonitor, case: Case, given: Given) -> dict[str, Any]:
    """Send one case and observe the status and whether the watched store saw it."""
    given.canary = f"cnry{secrets.token_hex(6)}"
    body = case.build(given)
    channel = hostile.write if case.target == "write" else hostile.read
    pg_mark, redis_mark = hostile.pg_log.size(), monitor.size()
    observed, details = await call_raw(channel, case, body)
    reached: bool | None = None
    evidence: list[str] = []
    if case.watch == "postgres":
        await hostile.pg_log.sync(hostile.database_url)
        text = hostile.pg_log.since(pg_mark)
        evidence = PostgresLog.statements_by(text, WRITE_APPLICATION)
        # A canary anywhere in the log (any session) also counts: nothing may carry refused input.
        reached = bool(evidence) or given.canary in text
    elif case.watch == "redis":
        await monitor.sync()
        lines = monitor.since(redis_mark)
        evidence = RedisMonitor.query_commands(lines, hostile.prefix)
        reached = bool(evidence) or any(given.canary in line for line in lines)
    return {
        "key": case.key,
        "rpc": case.rpc_label,
        "input": case.description,
        "expected": case.expected,
        "observed": observed,
        "details": details[:300],
        "watch": case.watch,
        "must_reach": case.must_reach,
        "reached": reached,
        "evidence": [e[:300] for e in evidence[:3]],
        "may_also": list(case.may_also),
        "known_defect": KNOWN_DEFECTS.get(case.key),
    }


def problems_in(row: dict[str, Any]) -> list[str]:
    """Why a result row breaks the matrix (empty when it holds)."""
    found = []
    if row["observed"] not in (row["expected"], *row["may_also"], row["known_defect"]):
        found.append(f"answered {row['observed']} ({row['details']!r}), expected {row['expected']}")
    if row["must_reach"] is not None and row["reached"] != row["must_reach"]:
        verb = "reached" if row["reached"] else "did not reach"
        found.append(f"{verb} {row['watch']}: {row['evidence']}")
    return found


async def test_bad_input_matrix(hostile: HostileStack, monitor: RedisMonitor) -> None:
    given = await given_state(hostile)
    # Commands cut off by a deadline go last, so that anything they still do cannot fall
    # into another row's observation window; the queries wait until the views are quiet.
    ordered = sorted(CASES, key=lambda c: (c.timeout < 0.01, c.target == "read"))
    results: dict[str, dict[str, Any]] = {}
    quiet = False
    for case in ordered:
        if case.target == "read" and not quiet:
            await hostile.wait_quiet()
            quiet = True
        results[case.key] = await run_case(hostile, monitor, case, given)
    rows = [results[case.key] for case in CASES]  # back in the order of the definition

    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows}, indent=2) + "\n", encoding="utf-8")
    failures = [f"{row['key']}: {'; '.join(problems)}" for row in rows if (problems := problems_in(row))]
    assert not failures, "\n".join(failures)

    await hostile.assert_healthy()
    for name, log in hostile.service_logs().items():
        assert "Traceback" not in log, f"{name} logged a traceback:\n{log[-3000:]}"

    document = render(rows)
    if os.environ.get(WRITE_DOC_ENV) == "1":
        DOCUMENT.write_text(document, encoding="utf-8")
    current = DOCUMENT.read_text(encoding="utf-8") if DOCUMENT.exists() else ""
    assert current == document, f"{DOCUMENT.name} is out of date; regenerate it with:\n{REPRODUCE}"


@pytest.mark.parametrize("rpc", ["RegisterUser", "UpdateUserProfile", "DeactivateUser"])
async def test_command_deadlines(hostile: HostileStack, rpc: str) -> None:
    """Commands cut off after 0.5 ms to 4 ms are applied entirely or not at all, and the views agree."""
    commands = cmd_grpc.UserCommandServiceStub(hostile.write)
    tag = secrets.token_hex(3)
    cut_off = {"DEADLINE_EXCEEDED"}
    outcomes: list[str] = []
    # grpc's timers are not exact to the millisecond (less so on a busy machine), so any one
    # call may still finish: keep going until enough were cut off, within a bounded count.
    # On an idle machine a fast command (UpdateUserProfile) beats all but the shortest
    # deadlines, about one call in fifteen: the bound leaves room for that.
    for n in range(360):
        if sum(o in cut_off for o in outcomes) >= 8:
            break
        # 0.2 ms to 2.4 ms: before, during and after the work (a command is two round trips, ~1-2 ms).
        timeout = 0.0002 * (1 + n % 12)
        target = ""
        if rpc != "RegisterUser":
            reply = await commands.RegisterUser(
                cmd.RegisterUserRequest(
                    email=f"dl{n}.{tag}@example.com", username=f"dl{n}_{tag}", password=VALID_PASSWORD, full_name="D"
                ),
                timeout=10,
            )
            target = reply.user_id
        try:
            if rpc == "RegisterUser":
                request: Any = cmd.RegisterUserRequest(
                    email=f"cut{n}.{tag}@example.com", username=f"cut{n}_{tag}", password=VALID_PASSWORD, full_name="C"
                )
                await commands.RegisterUser(request, timeout=timeout)
            elif rpc == "UpdateUserProfile":
                await commands.UpdateUserProfile(
                    cmd.UpdateUserProfileRequest(user_id=target, full_name=f"Cut {n}"), timeout=timeout
                )
            else:
                await commands.DeactivateUser(
                    cmd.DeactivateUserRequest(user_id=target, reason=f"cut {n}"), timeout=timeout
                )
            outcomes.append("OK")
        except grpc.aio.AioRpcError as error:
            outcomes.append(error.code().name)
    assert set(outcomes) <= {"OK", *cut_off}, outcomes
    assert sum(o in cut_off for o in outcomes) >= 8, outcomes

    conn = await asyncpg.connect(hostile.database_url)
    try:
        # A call the client gave up on may still be finishing in the write service: wait until
        # none of its transactions is open, so the snapshot below is the final state.
        deadline = time.monotonic() + 10
        while busy := await conn.fetch(
            "SELECT pid, state, wait_event_type, wait_event, backend_xid, xact_start, state_change, "
            "now() - state_change AS in_state_for, query FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = $1 AND state <> 'idle'",
            WRITE_APPLICATION,
        ):
            assert time.monotonic() < deadline, "the write service kept a transaction open:\n" + "\n".join(
                str(dict(row)) for row in busy
            )
            await asyncio.sleep(0.01)
        # Each command is one transaction, so every snapshot must show all of it or none of it.
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            users = await conn.fetch(
                "SELECT id::text AS id, version, active, full_name FROM users WHERE username LIKE $1",
                f"%_{tag}",
            )
            events = await conn.fetch(
                "SELECT aggregate_id, aggregate_version, event_type, event_id FROM outbox WHERE aggregate_id = ANY($1)",
                [u["id"] for u in users],
            )
            log = await conn.fetch(
                "SELECT aggregate_id, command_type, outcome, event_ids FROM command_log WHERE aggregate_id = ANY($1)",
                [u["id"] for u in users],
            )
        failed = [r for r in log if r["outcome"] == "failed"]
        assert not failed, failed
        for user in users:
            mine = sorted(e["aggregate_version"] for e in events if e["aggregate_id"] == user["id"])
            assert mine == list(range(1, user["version"] + 1)), (user, mine)
            logged = [r for r in log if r["aggregate_id"] == user["id"] and r["outcome"] == "succeeded"]
            logged_events = sorted(str(i) for r in logged for i in r["event_ids"])
            assert logged_events == sorted(str(e["event_id"]) for e in events if e["aggregate_id"] == user["id"])
        if rpc == "RegisterUser":
            applied = {u["id"] for u in users if u["full_name"] == "C"}
        elif rpc == "UpdateUserProfile":
            applied = {u["id"] for u in users if u["full_name"].startswith("Cut")}
            assert all(u["version"] == 2 for u in users if u["id"] in applied)
        else:
            applied = {u["id"] for u in users if not u["active"]}
    finally:
        await conn.close()

    # The views converge on exactly what Postgres holds.
    await hostile.wait_quiet()
    queries = qry_grpc.UserQueryServiceStub(hostile.read)
    page = await queries.ListUsers(qry.ListUsersRequest(search=tag, page_size=100), timeout=5)
    views = {u.user_id: u for u in page.users}
    assert set(views) == {u["id"] for u in users}
    for user in users:
        assert views[user["id"]].version == user["version"]
    if rpc == "DeactivateUser":
        assert {i for i, v in views.items() if not v.active} == applied
    await hostile.assert_healthy()


async def test_case_variants_of_a_non_ascii_email_are_one_address(hostile: HostileStack) -> None:
    commands = cmd_grpc.UserCommandServiceStub(hostile.write)
    queries = qry_grpc.UserQueryServiceStub(hostile.read)
    tag = secrets.token_hex(3)
    first = await commands.RegisterUser(
        cmd.RegisterUserRequest(
            email=f"Àda.{tag}@example.com", username=f"upper_{tag}", password=VALID_PASSWORD, full_name="A"
        ),
        timeout=10,
    )
    await eventually(
        lambda: queries.GetUserByEmail(qry.GetUserByEmailRequest(email=f"Àda.{tag}@example.com"), timeout=5)
    )
    # Lower case, and the decomposed spelling (A + combining grave accent): the same address.
    for n, variant in enumerate((f"àda.{tag}@example.com", f"A\u0300da.{tag}@example.com")):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await commands.RegisterUser(
                cmd.RegisterUserRequest(
                    email=variant, username=f"variant{n}_{tag}", password=VALID_PASSWORD, full_name="B"
                ),
                timeout=10,
            )
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    await hostile.wait_quiet()
    found = await queries.GetUserByEmail(qry.GetUserByEmailRequest(email=f"Àda.{tag}@example.com"), timeout=5)
    assert found.user.user_id == first.user_id, "the lookup answers with another account"
