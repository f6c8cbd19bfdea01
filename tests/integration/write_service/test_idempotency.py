"""Idempotency keys, expected versions and the audit columns against the real Postgres."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from shared_kernel.contracts import errors
from tests.integration.write_service.support import wait_until_blocked
from tests.integration.write_service.tables import rows
from tests.unit.write_service import helpers
from write_service.adapters.unit_of_work import PostgresExpiredKeyPurger, PostgresUnitOfWork
from write_service.service_layer.command_steps import CommandResult, Dependencies
from write_service.service_layer.messagebus import CommandBus
from write_service.service_layer.ports import IdempotencyScope

pytestmark = pytest.mark.integration


def encode(result: CommandResult) -> bytes:
    return f"reply:{result.aggregate_id}:{result.version}".encode()


def bus_on(pool: asyncpg.Pool[Any], **kwargs: Any) -> CommandBus:
    return CommandBus(lambda d: PostgresUnitOfWork(pool, d), Dependencies(hasher=helpers.cheap_hasher()), **kwargs)


async def stored_keys(pool: asyncpg.Pool[Any]) -> list[dict[str, Any]]:
    return [dict(r) for r in await pool.fetch("SELECT * FROM idempotency_keys ORDER BY created_at")]


async def test_a_retry_returns_the_identical_reply_and_writes_nothing_new(pg_bus, db_pool):
    key = helpers.key()
    command = helpers.register(email="Keyed@Example.com")
    first_meta = helpers.meta(principal="signup-service", idempotency_key=key)
    first = await pg_bus.dispatch(command, first_meta, encode_reply=encode)
    retry_meta = helpers.meta(principal="signup-service", idempotency_key=key)
    again = await pg_bus.dispatch(command, retry_meta, encode_reply=encode)

    assert again.reply == first.reply == encode(first)
    assert (again.aggregate_id, again.version, again.replay_of) == (first.aggregate_id, 1, first_meta.command_id)
    assert len(await rows(db_pool, "users")) == 1
    assert len(await rows(db_pool, "outbox")) == 1
    [stored] = await stored_keys(db_pool)
    assert (stored["principal"], stored["command_type"], stored["idempotency_key"]) == (
        "signup-service",
        "RegisterUser",
        key,
    )
    assert stored["lock_id"] == IdempotencyScope("signup-service", "RegisterUser", key).lock_id
    assert len(stored["fingerprint"]) == 32
    assert bytes(stored["reply"]) == first.reply
    assert stored["command_id"] == first_meta.command_id
    assert stored["expires_at"] - stored["created_at"] == timedelta(days=1)
    # Neither the request nor the password is kept: only its fingerprint.
    row_text = await db_pool.fetchval("SELECT k::text FROM idempotency_keys AS k")
    for secret in (helpers.PASSWORD, "Keyed@Example.com", command.username):
        assert secret not in row_text

    succeeded, replayed = await rows(db_pool, "command_log")
    assert (succeeded["command_id"], succeeded["outcome"]) == (first_meta.command_id, "succeeded")
    assert (replayed["command_id"], replayed["outcome"], replayed["status_code"]) == (
        retry_meta.command_id,
        "replayed",
        "OK",
    )
    for entry in (succeeded, replayed):
        assert (entry["principal"], entry["idempotency_key"]) == ("signup-service", key)
    assert succeeded["replay_of"] is None
    assert replayed["replay_of"] == first_meta.command_id
    assert replayed["event_ids"] == []
    assert replayed["aggregate_id"] == str(first.aggregate_id)


async def test_a_retried_update_changes_the_state_once(pg_bus, db_pool):
    user_id = (await pg_bus.dispatch(helpers.register(), helpers.meta())).aggregate_id
    key = helpers.key()
    results = [
        await pg_bus.dispatch(
            helpers.update(user_id, full_name="Once"), helpers.meta(idempotency_key=key), encode_reply=encode
        )
        for _ in range(3)
    ]
    assert {r.reply for r in results} == {encode(results[0])}
    assert [r.version for r in results] == [2, 2, 2]
    [user] = await rows(db_pool, "users")
    assert user["version"] == 2
    assert [e["aggregate_version"] for e in await rows(db_pool, "outbox")] == [1, 2]


async def test_the_same_key_with_another_request_is_invalid(pg_bus, db_pool):
    user_id = (await pg_bus.dispatch(helpers.register(), helpers.meta())).aggregate_id
    key = helpers.key()
    await pg_bus.dispatch(helpers.update(user_id, full_name="First"), helpers.meta(idempotency_key=key))
    with pytest.raises(errors.InvalidArgument, match="already used for a different request") as exc_info:
        await pg_bus.dispatch(helpers.update(user_id, full_name="Second"), helpers.meta(idempotency_key=key))
    assert [v.field for v in exc_info.value.violations] == ["idempotency-key"]
    [user] = await rows(db_pool, "users")
    assert (user["full_name"], user["version"]) == ("First", 2)
    assert len(await rows(db_pool, "outbox")) == 2
    entry = (await rows(db_pool, "command_log"))[-1]
    assert (entry["outcome"], entry["status_code"], entry["idempotency_key"]) == ("rejected", "INVALID_ARGUMENT", key)


async def test_two_concurrent_calls_with_one_key_have_one_effect(db_pool):
    bus = bus_on(db_pool)
    user_id = (await bus.dispatch(helpers.register(), helpers.meta())).aggregate_id
    key = helpers.key()
    outcomes = await asyncio.gather(
        *(
            bus.dispatch(
                helpers.update(user_id, full_name="Racer"), helpers.meta(idempotency_key=key), encode_reply=encode
            )
            for _ in range(8)
        ),
        return_exceptions=True,
    )
    replies = {o.reply for o in outcomes if isinstance(o, CommandResult)}
    failures = [o for o in outcomes if not isinstance(o, CommandResult)]
    assert replies == {encode(CommandResult(user_id, 2))}
    # A call that found the key still held after its retries is ABORTED; nothing else may fail.
    assert all(isinstance(f, errors.Conflict) for f in failures), failures
    [user] = await rows(db_pool, "users")
    assert user["version"] == 2
    assert len(await rows(db_pool, "outbox")) == 2
    assert len(await stored_keys(db_pool)) == 1


async def test_a_key_held_by_a_running_command_is_aborted_then_replayed(db_pool):
    bus = bus_on(db_pool, max_attempts=2, retry_backoff_s=0.001)
    user_id = (await bus.dispatch(helpers.register(), helpers.meta())).aggregate_id
    key = helpers.key()
    holder = await db_pool.acquire()
    try:
        tx = holder.transaction()
        await tx.start()
        try:
            # The first call takes the key's lock, then waits for the user's row lock held here.
            await holder.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user_id)
            first_meta = helpers.meta(idempotency_key=key)
            first = asyncio.create_task(bus.dispatch(helpers.update(user_id), first_meta, encode_reply=encode))
            await wait_until_blocked(db_pool)
            with pytest.raises(errors.Conflict, match="still in progress"):
                await bus.dispatch(helpers.update(user_id), helpers.meta(idempotency_key=key), encode_reply=encode)
        finally:
            await tx.rollback()
    finally:
        await db_pool.release(holder)
    result = await asyncio.wait_for(first, 10)
    retried = await bus.dispatch(helpers.update(user_id), helpers.meta(idempotency_key=key), encode_reply=encode)
    assert (retried.reply, retried.replay_of) == (result.reply, first_meta.command_id)
    assert [e["outcome"] for e in await rows(db_pool, "command_log")] == [
        "succeeded",
        "succeeded",
        "failed",
        "replayed",
    ]


async def test_a_rejected_command_is_not_stored_and_its_retry_is_evaluated_again(pg_bus, db_pool):
    user_id = (await pg_bus.dispatch(helpers.register(), helpers.meta())).aggregate_id
    await pg_bus.dispatch(helpers.deactivate(user_id), helpers.meta())
    key = helpers.key()
    for _ in range(2):
        with pytest.raises(errors.FailedPrecondition):
            await pg_bus.dispatch(helpers.deactivate(user_id), helpers.meta(idempotency_key=key))
    assert await stored_keys(db_pool) == []
    assert [e["outcome"] for e in await rows(db_pool, "command_log")][-2:] == ["rejected", "rejected"]


async def test_an_expired_key_that_was_not_yet_deleted_is_forgotten(pg_bus, db_pool):
    user_id = (await pg_bus.dispatch(helpers.register(), helpers.meta())).aggregate_id
    key = helpers.key()
    await pg_bus.dispatch(helpers.update(user_id), helpers.meta(idempotency_key=key))
    await db_pool.execute("UPDATE idempotency_keys SET expires_at = created_at + interval '1 microsecond'")
    again = await pg_bus.dispatch(helpers.update(user_id), helpers.meta(idempotency_key=key))
    assert (again.version, again.replay_of) == (3, None)
    [stored] = await stored_keys(db_pool)
    assert stored["aggregate_version"] == 3
    assert stored["expires_at"] > datetime.now(UTC)


async def test_the_purge_deletes_only_expired_keys_whose_lock_is_free(pg_bus, db_pool):
    user_id = (await pg_bus.dispatch(helpers.register(), helpers.meta())).aggregate_id
    keys = {name: helpers.key() for name in ("live", "expired", "held")}
    for name, key in keys.items():
        await pg_bus.dispatch(helpers.update(user_id, full_name=name), helpers.meta(idempotency_key=key))
    await db_pool.execute(
        "UPDATE idempotency_keys SET created_at = now() - interval '2 days', expires_at = now() - interval '1 day' "
        "WHERE idempotency_key = ANY($1::text[])",
        [keys["expired"], keys["held"]],
    )
    purger = PostgresExpiredKeyPurger(db_pool)
    held = IdempotencyScope("anonymous", "UpdateUserProfile", keys["held"])
    holder = await db_pool.acquire()
    try:
        async with holder.transaction():
            # What a command using this key holds while it runs.
            await holder.execute("SELECT pg_advisory_xact_lock($1)", held.lock_id)
            assert await purger.purge(datetime.now(UTC), 100) == 1
            remaining = {r["idempotency_key"] for r in await stored_keys(db_pool)}
            assert remaining == {keys["live"], keys["held"]}
    finally:
        await db_pool.release(holder)
    assert await purger.purge(datetime.now(UTC), 100) == 1
    assert [r["idempotency_key"] for r in await stored_keys(db_pool)] == [keys["live"]]
    assert await purger.purge(datetime.now(UTC), 100) == 0


async def test_the_purge_goes_in_batches(pg_bus, db_pool):
    user_id = (await pg_bus.dispatch(helpers.register(), helpers.meta())).aggregate_id
    for i in range(5):
        await pg_bus.dispatch(helpers.update(user_id, full_name=f"n{i}"), helpers.meta(idempotency_key=helpers.key()))
    await db_pool.execute("UPDATE idempotency_keys SET expires_at = created_at + interval '1 second'")
    purger = PostgresExpiredKeyPurger(db_pool)
    later = datetime.now(UTC) + timedelta(minutes=1)
    assert [await purger.purge(later, 2) for _ in range(4)] == [2, 2, 1, 0]


async def test_expected_versions_against_postgres(pg_bus, db_pool):
    user_id = (await pg_bus.dispatch(helpers.register(), helpers.meta())).aggregate_id
    assert (await pg_bus.dispatch(helpers.update(user_id, expected_version=1), helpers.meta())).version == 2
    with pytest.raises(errors.FailedPrecondition) as exc_info:
        await pg_bus.dispatch(helpers.deactivate(user_id, expected_version=1), helpers.meta())
    assert exc_info.value.message == f"user {user_id} is at version 2, not the expected version 1"
    [user] = await rows(db_pool, "users")
    assert (user["version"], user["active"]) == (2, True)
    entry = (await rows(db_pool, "command_log"))[-1]
    assert (entry["outcome"], entry["status_code"]) == ("rejected", "FAILED_PRECONDITION")
    assert entry["summary"]["expected_version"] == 1
    assert (await pg_bus.dispatch(helpers.deactivate(user_id, expected_version=2), helpers.meta())).version == 3


async def test_every_log_row_names_the_principal(pg_bus, db_pool):
    await pg_bus.dispatch(helpers.register(), helpers.meta(principal="svc-a"))
    with pytest.raises(errors.NotFound):
        await pg_bus.dispatch(helpers.deactivate(uuid.uuid4()), helpers.meta(principal="svc-b"))
    assert [(e["principal"], e["outcome"], e["idempotency_key"]) for e in await rows(db_pool, "command_log")] == [
        ("svc-a", "succeeded", ""),
        ("svc-b", "rejected", ""),
    ]


async def test_the_log_refuses_a_replay_without_its_original(db_pool):
    with pytest.raises(asyncpg.CheckViolationError):
        await db_pool.execute(
            "INSERT INTO command_log (command_id, command_type, received_at, completed_at, outcome) "
            "VALUES ($1, 'RegisterUser', now(), now(), 'replayed')",
            uuid.uuid4(),
        )
