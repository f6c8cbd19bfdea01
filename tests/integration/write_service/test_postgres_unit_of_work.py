"""The Postgres unit of work: state, outbox and command log commit together or not at all."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from opentelemetry.sdk.trace import TracerProvider

from shared_kernel.contracts import errors
from tessera.users.v1 import events_pb2
from tests.integration.write_service.support import wait_until_blocked
from tests.integration.write_service.tables import everything_as_text, rows
from tests.unit.write_service import helpers
from write_service.adapters.unit_of_work import PostgresUnitOfWork
from write_service.domain import users
from write_service.service_layer.command_steps import Dependencies
from write_service.service_layer.deadline import Deadline
from write_service.service_layer.messagebus import CommandBus
from write_service.service_layer.ports import CommandLogEntry

pytestmark = pytest.mark.integration


def bus_on(pool: asyncpg.Pool[Any], **kwargs: Any) -> CommandBus:
    return CommandBus(lambda d: PostgresUnitOfWork(pool, d), Dependencies(hasher=helpers.cheap_hasher()), **kwargs)


async def test_register_commits_state_outbox_and_log_in_one_transaction(pg_bus, db_pool):
    tracer = TracerProvider().get_tracer("test")
    command = helpers.register(email="Grace@Example.com", username="GraceH")
    meta = helpers.meta(correlation_id="corr-123")
    with tracer.start_as_current_span("command") as span:
        result = await pg_bus.dispatch(command, meta)
    span_context = span.get_span_context()

    [user] = await rows(db_pool, "users")
    assert user["id"] == result.aggregate_id
    assert (user["email"], user["username"], user["version"], user["active"]) == (
        "Grace@Example.com",
        "GraceH",
        1,
        True,
    )
    assert user["password_hash"].startswith("$argon2id$")

    [event] = await rows(db_pool, "outbox")
    assert event["event_type"] == "tessera.users.v1.UserRegistered"
    assert (event["aggregate_type"], event["aggregate_id"], event["aggregate_version"]) == (
        "user",
        str(result.aggregate_id),
        1,
    )
    # UserRegistered is at schema version 2: the name travels in display_name (decision 0030).
    assert event["schema_version"] == 2
    assert event["position"] is None
    assert event["correlation_id"] == "corr-123"
    assert event["causation_id"] == str(meta.command_id)
    # The outbox row carries the context of the transaction span, a child of the caller's span.
    assert event["traceparent"].startswith(f"00-{span_context.trace_id:032x}-")
    assert not event["traceparent"].startswith(f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-")
    assert event["occurred_at"] == user["created_at"]
    payload = events_pb2.UserRegistered.FromString(bytes(event["payload"]))
    assert (payload.user_id, payload.email, payload.username, payload.display_name) == (
        str(result.aggregate_id),
        "Grace@Example.com",
        "GraceH",
        "Ada Lovelace",
    )

    [entry] = await rows(db_pool, "command_log")
    assert entry["command_id"] == meta.command_id
    assert (entry["command_type"], entry["outcome"], entry["status_code"]) == ("RegisterUser", "succeeded", "OK")
    assert (entry["aggregate_type"], entry["aggregate_id"]) == ("user", str(result.aggregate_id))
    assert entry["event_ids"] == [event["event_id"]]
    assert entry["correlation_id"] == "corr-123"
    assert entry["summary"] == {"email": "Grace@Example.com", "username": "GraceH"}
    assert entry["received_at"] <= entry["completed_at"]
    assert helpers.PASSWORD not in await everything_as_text(db_pool)


async def test_without_a_caller_span_the_transaction_span_starts_the_trace(pg_bus, db_pool):
    await pg_bus.dispatch(helpers.register(), helpers.meta())
    await pg_bus.dispatch(helpers.register(), helpers.meta())
    first, second = await rows(db_pool, "outbox")
    for event in (first, second):
        version, trace_id, span_id, flags = event["traceparent"].split("-")
        assert (version, len(trace_id), len(span_id)) == ("00", 32, 16)
        assert int(flags, 16) & 1, "the transaction span is sampled"
        assert event["tracestate"] == ""
    # Each command is a trace of its own.
    assert first["traceparent"].split("-")[1] != second["traceparent"].split("-")[1]


async def test_a_failure_after_the_outbox_insert_writes_nothing(db_pool):
    now = datetime.now(UTC)
    user = users.User.register(
        user_id=uuid.uuid4(), email="x@example.com", username="xyz", password_hash="h", full_name="X", now=now
    )
    with pytest.raises(RuntimeError, match="boom"):
        async with PostgresUnitOfWork(db_pool, Deadline.after(5)) as uow:
            await uow.users.add(user)
            await uow.append_events(user.pending_events, correlation_id="c", causation_id="c")
            await uow.log_command(
                CommandLogEntry(
                    command_id=uuid.uuid4(),
                    command_type="RegisterUser",
                    aggregate_type="user",
                    aggregate_id=str(user.id),
                    correlation_id="c",
                    received_at=now,
                    completed_at=now,
                    outcome="succeeded",
                )
            )
            raise RuntimeError("boom")
    for name in ("users", "outbox", "command_log"):
        assert await rows(db_pool, name) == []


async def test_a_failing_command_log_insert_rolls_back_state_and_outbox(pg_bus, db_pool):
    meta = helpers.meta()
    # A row already holding this command id makes the command's own log insert fail last.
    await db_pool.execute(
        "INSERT INTO command_log (command_id, command_type, received_at, completed_at, outcome) "
        "VALUES ($1, 'Other', now(), now(), 'succeeded')",
        meta.command_id,
    )
    with pytest.raises(asyncpg.UniqueViolationError):
        await pg_bus.dispatch(helpers.register(), meta)
    assert await rows(db_pool, "users") == []
    assert await rows(db_pool, "outbox") == []
    assert [r["command_type"] for r in await rows(db_pool, "command_log")] == ["Other"]


@pytest.mark.parametrize(
    ("field", "email", "username"),
    [("email", "TAKEN@example.com", "fresh"), ("username", "fresh@example.com", "TAKEN")],
)
async def test_a_unique_index_violation_is_already_exists(db_pool, field, email, username):
    now = datetime.now(UTC)
    await db_pool.execute(
        "INSERT INTO users (id, email, email_key, username, password_hash, full_name, version, "
        "created_at, updated_at) "
        "VALUES ($1, 'taken@example.com', 'taken@example.com', 'taken', 'h', 'T', 1, now(), now())",
        uuid.uuid4(),
    )
    twin = users.User.register(
        user_id=uuid.uuid4(), email=email, username=username, password_hash="h", full_name="T", now=now
    )
    with pytest.raises(errors.AlreadyExists) as exc_info:
        # Straight to add(): the race where the pre-check saw nothing.
        async with PostgresUnitOfWork(db_pool, Deadline.after(5)) as uow:
            await uow.users.add(twin)
    assert exc_info.value.field == field
    assert field in exc_info.value.message


async def test_the_registration_race_is_already_exists(pg_bus, db_pool):
    rival = await db_pool.acquire()
    try:
        tx = rival.transaction()
        await tx.start()
        await rival.execute(
            "INSERT INTO users (id, email, email_key, username, password_hash, full_name, version, "
            "created_at, updated_at) "
            "VALUES ($1, 'race@example.com', 'race@example.com', 'racer', 'h', 'R', 1, now(), now())",
            uuid.uuid4(),
        )
        meta = helpers.meta()
        # The uncommitted rival is invisible to the pre-check, so the insert waits on the index.
        task = asyncio.create_task(pg_bus.dispatch(helpers.register(email="RACE@example.com"), meta))
        await wait_until_blocked(db_pool)
        await tx.commit()
        with pytest.raises(errors.AlreadyExists) as exc_info:
            await task
    finally:
        await db_pool.release(rival)
    assert exc_info.value.field == "email"
    assert len(await rows(db_pool, "users")) == 1
    assert await rows(db_pool, "outbox") == []
    [entry] = await rows(db_pool, "command_log")
    assert (entry["command_id"], entry["outcome"], entry["status_code"]) == (
        meta.command_id,
        "rejected",
        "ALREADY_EXISTS",
    )


async def test_concurrent_updates_get_consecutive_versions(pg_bus, db_pool):
    registered = await pg_bus.dispatch(helpers.register(), helpers.meta())
    user_id = registered.aggregate_id
    names = [f"name {i}" for i in range(20)]
    results = await asyncio.gather(
        *(pg_bus.dispatch(helpers.update(user_id, full_name=name), helpers.meta()) for name in names)
    )
    versions = sorted(r.version for r in results)
    assert versions == list(range(2, 22))
    [user] = await rows(db_pool, "users")
    assert user["version"] == 21
    last = next(name for name, r in zip(names, results, strict=True) if r.version == 21)
    assert user["full_name"] == last
    events = await rows(db_pool, "outbox")
    assert [e["aggregate_version"] for e in events if e["aggregate_id"] == str(user_id)] == list(range(1, 22))
    # Each event carries the profile its command wrote: no update was lost or overwritten.
    by_version = {
        e["aggregate_version"]: events_pb2.UserProfileUpdated.FromString(bytes(e["payload"])).full_name
        for e in events[1:]
    }
    assert sorted(by_version.values()) == sorted(names)


async def test_a_rejected_command_is_logged_in_its_own_transaction(pg_bus, db_pool):
    registered = await pg_bus.dispatch(helpers.register(), helpers.meta())
    user_id = registered.aggregate_id
    await pg_bus.dispatch(helpers.deactivate(user_id, reason="first"), helpers.meta())
    meta = helpers.meta(correlation_id="second-try")
    with pytest.raises(errors.FailedPrecondition):
        await pg_bus.dispatch(helpers.deactivate(user_id, reason="second"), meta)
    [user] = await rows(db_pool, "users")
    assert (user["version"], user["deactivation_reason"]) == (2, "first")
    assert len(await rows(db_pool, "outbox")) == 2
    entry = next(e for e in await rows(db_pool, "command_log") if e["command_id"] == meta.command_id)
    assert (entry["outcome"], entry["status_code"]) == ("rejected", "FAILED_PRECONDITION")
    assert entry["error_message"] == "user is already deactivated"
    assert entry["event_ids"] == []
    assert entry["aggregate_id"] == str(user_id)
    assert entry["correlation_id"] == "second-try"
    assert entry["summary"] == {"user_id": str(user_id), "reason": "second"}


async def test_unknown_user_is_not_found(pg_bus, db_pool):
    with pytest.raises(errors.NotFound):
        await pg_bus.dispatch(helpers.update(uuid.uuid4()), helpers.meta())
    [entry] = await rows(db_pool, "command_log")
    assert entry["status_code"] == "NOT_FOUND"


async def test_serialization_failures_are_retried_then_succeed(db_pool):
    failures = [asyncpg.exceptions.SerializationError("could not serialize access")]

    class Flaky(PostgresUnitOfWork):
        async def commit(self) -> None:
            if failures:
                raise failures.pop()
            await super().commit()

    bus = CommandBus(lambda d: Flaky(db_pool, d), Dependencies(hasher=helpers.cheap_hasher()))
    result = await bus.dispatch(helpers.register(), helpers.meta())
    assert result.version == 1
    assert len(await rows(db_pool, "users")) == 1
    assert len(await rows(db_pool, "outbox")) == 1


async def test_deadlocks_exhaust_the_retries_as_conflict(db_pool):
    class Deadlocked(PostgresUnitOfWork):
        """Every command transaction deadlocks; the bus's own log write does not."""

        wrote_events = False

        async def append_events(self, events, *, correlation_id, causation_id):
            self.wrote_events = True
            await super().append_events(events, correlation_id=correlation_id, causation_id=causation_id)

        async def commit(self) -> None:
            if self.wrote_events:
                raise asyncpg.exceptions.DeadlockDetectedError("deadlock detected")
            await super().commit()

    bus = CommandBus(lambda d: Deadlocked(db_pool, d), Dependencies(hasher=helpers.cheap_hasher()), max_attempts=2)
    meta = helpers.meta()
    with pytest.raises(errors.Conflict):
        await bus.dispatch(helpers.register(), meta)
    assert await rows(db_pool, "users") == []
    [entry] = await rows(db_pool, "command_log")
    assert (entry["command_id"], entry["outcome"], entry["status_code"]) == (meta.command_id, "failed", "ABORTED")


async def test_a_pool_acquire_timeout_is_unavailable(database_url):
    pool: asyncpg.Pool[Any] = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        bus = bus_on(pool)
        async with pool.acquire():
            started = time.monotonic()
            with pytest.raises(errors.Unavailable, match="no database connection"):
                await bus.dispatch(helpers.register(), helpers.meta(seconds=0.3))
            assert time.monotonic() - started < 2.0
    finally:
        await pool.close()


async def test_postgres_down_is_unavailable():
    # Nothing listens on port 1; min_size=0 defers connecting to the first acquire.
    pool: asyncpg.Pool[Any] = await asyncpg.create_pool(
        "postgresql://postgres@127.0.0.1:1/postgres", min_size=0, max_size=1
    )
    try:
        with pytest.raises(errors.Unavailable):
            await bus_on(pool).dispatch(helpers.deactivate(uuid.uuid4()), helpers.meta(seconds=2))
    finally:
        await pool.close()


async def test_a_lock_wait_is_bounded_by_the_deadline(pg_bus, db_pool):
    registered = await pg_bus.dispatch(helpers.register(), helpers.meta())
    user_id = registered.aggregate_id
    holder = await db_pool.acquire()
    try:
        tx = holder.transaction()
        await tx.start()
        try:
            await holder.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user_id)
            started = time.monotonic()
            with pytest.raises(errors.Unavailable, match="time limit"):
                await pg_bus.dispatch(helpers.update(user_id), helpers.meta(seconds=0.5))
            assert time.monotonic() - started < 3.0
        finally:
            await tx.rollback()
    finally:
        await db_pool.release(holder)
    # The pool is healthy afterwards and the timed-out command left nothing behind.
    result = await pg_bus.dispatch(helpers.update(user_id, full_name="after"), helpers.meta())
    assert result.version == 2
    assert len(await rows(db_pool, "outbox")) == 2


async def test_a_command_cut_off_by_its_deadline_leaves_no_statement_running(database_url, db_pool):
    """A command whose lock wait its deadline cut off cancels the statement and keeps its connection.

    The command's own time is spent by then, so the release needs a budget of its own.
    """
    # The command's pool of its own, so its sessions can be told apart from the test's.
    pool: asyncpg.Pool[Any] = await asyncpg.create_pool(
        database_url, min_size=1, max_size=1, server_settings={"application_name": "cut-off-command"}
    )
    try:
        bus = bus_on(pool)
        user_id = (await bus.dispatch(helpers.register(), helpers.meta())).aggregate_id
        session = await pool.fetchval("SELECT pg_backend_pid()")
        holder = await db_pool.acquire()
        try:
            async with holder.transaction():
                await holder.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user_id)
                # Little time left when it takes its connection, so the pool's own budget for the
                # release is spent too by the time the lock wait is cancelled.
                with pytest.raises(errors.Unavailable, match="time limit"):
                    await bus.dispatch(helpers.update(user_id), helpers.meta(seconds=0.002))
                # The lock is still held: only a cancel on the server can end the command's wait.
                deadline = time.monotonic() + 3
                while running := await holder.fetch(
                    "SELECT pid, state, wait_event_type, query FROM pg_stat_activity "
                    "WHERE application_name = 'cut-off-command' AND state <> 'idle'"
                ):
                    assert time.monotonic() < deadline, [dict(row) for row in running]
                    await asyncio.sleep(0.01)
        finally:
            await db_pool.release(holder)
        # The release waited for the cancel and rolled back, so the pool kept its connection
        # (terminating it would also have dropped the cancel request still on its way).
        assert await pool.fetchval("SELECT pg_backend_pid()") == session
        assert (await bus.dispatch(helpers.update(user_id, full_name="after"), helpers.meta())).version == 2
    finally:
        await asyncio.wait_for(pool.close(), 10)
