"""Idempotency keys and expected versions through the command bus, over the in-memory fakes."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import SecretStr

from shared_kernel.contracts import errors
from tests.unit.write_service import helpers
from write_service.adapters.memory import InMemoryDatabase, InMemoryExpiredKeyPurger, InMemoryUnitOfWork
from write_service.entrypoints.idempotency_cleanup import ExpiredKeyCleanup
from write_service.service_layer.command_steps import CommandResult, Dependencies
from write_service.service_layer.deadline import Deadline
from write_service.service_layer.idempotency import fingerprint, key_violation, secret_salt
from write_service.service_layer.messagebus import CommandBus
from write_service.service_layer.ports import IdempotencyScope, StoredReply

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@pytest.fixture
def db() -> InMemoryDatabase:
    return InMemoryDatabase()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def bus(db, clock, sleeps) -> CommandBus:
    return CommandBus(
        lambda deadline: InMemoryUnitOfWork(db, deadline),
        Dependencies(hasher=helpers.cheap_hasher(), clock=clock),
        retry_backoff_s=0.01,
        idempotency_retention=timedelta(hours=1),
        sleep=sleeps,
    )


def encode(result: CommandResult) -> bytes:
    return f"{result.aggregate_id}@{result.version}".encode()


async def registered(bus: CommandBus) -> uuid.UUID:
    return (await bus.dispatch(helpers.register(), helpers.meta())).aggregate_id


# --- the key itself ----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["a", "k" * 255, "9f1c-2b", "with spaces and ~!@#$%^&*()"])
def test_good_keys(value):
    assert key_violation(value) is None


@pytest.mark.parametrize("value", ["", "k" * 256, "tab\there", "naïve", "nul\x00", "line\nfeed"])
def test_bad_keys_name_the_header(value):
    violation = key_violation(value)
    assert violation is not None
    assert violation.field == "idempotency-key"
    assert "1 to 255 printable ASCII" in violation.description


def test_the_lock_id_is_a_stable_signed_64_bit_number_per_scope():
    scope = IdempotencyScope("svc-a", "RegisterUser", "k1")
    assert scope.lock_id == IdempotencyScope("svc-a", "RegisterUser", "k1").lock_id
    assert -(2**63) <= scope.lock_id < 2**63
    others = {
        IdempotencyScope("svc-b", "RegisterUser", "k1").lock_id,
        IdempotencyScope("svc-a", "DeactivateUser", "k1").lock_id,
        IdempotencyScope("svc-a", "RegisterUser", "k2").lock_id,
        # The parts are encoded unambiguously: moving a character between them changes the id.
        IdempotencyScope("svc-aR", "egisterUser", "k1").lock_id,
    }
    assert scope.lock_id not in others
    assert len(others) == 4


# --- the fingerprint ---------------------------------------------------------------------


async def test_the_fingerprint_is_the_same_for_the_same_request_and_differs_otherwise():
    hasher = helpers.cheap_hasher()
    scope = IdempotencyScope("svc", "UpdateUserProfile", "k")
    user_id = uuid.uuid4()
    first = await fingerprint(helpers.update(user_id, full_name="A"), scope, hasher)
    assert len(first) == 32
    assert first == await fingerprint(helpers.update(user_id, full_name="A"), scope, hasher)
    assert first != await fingerprint(helpers.update(user_id, full_name="B"), scope, hasher)
    assert first != await fingerprint(helpers.update(user_id, full_name="A", expected_version=1), scope, hasher)
    assert first != await fingerprint(helpers.update(uuid.uuid4(), full_name="A"), scope, hasher)


async def test_a_password_enters_the_fingerprint_only_through_a_salted_slow_digest():
    hasher = helpers.cheap_hasher()
    scope = IdempotencyScope("svc", "RegisterUser", "k")
    command = helpers.register(email="a@example.com", username="ada")
    assert "password" not in command.fingerprint_fields()
    assert set(command.secret_fields()) == {"password"}
    same = helpers.register(email="a@example.com", username="ada")
    other_password = helpers.register(email="a@example.com", username="ada", password="another password 1")
    assert await fingerprint(command, scope, hasher) == await fingerprint(same, scope, hasher)
    assert await fingerprint(command, scope, hasher) != await fingerprint(other_password, scope, hasher)
    # The digest is argon2id under a per-scope salt: another key salts it differently.
    other_scope = IdempotencyScope("svc", "RegisterUser", "k2")
    assert secret_salt(scope) != secret_salt(other_scope)
    digest = await hasher.derive(SecretStr(helpers.PASSWORD), secret_salt(scope))
    assert digest == await hasher.derive(SecretStr(helpers.PASSWORD), secret_salt(scope))
    assert digest != await hasher.derive(SecretStr(helpers.PASSWORD), secret_salt(other_scope))
    assert len(digest) == 32


# --- retries -----------------------------------------------------------------------------


async def test_a_retry_returns_the_stored_reply_without_a_second_effect(bus, db):
    key = helpers.key()
    command = helpers.register()
    first_meta = helpers.meta(principal="billing", idempotency_key=key)
    first = await bus.dispatch(command, first_meta, encode_reply=encode)
    assert first.reply == encode(first)
    assert first.replay_of is None
    retry_meta = helpers.meta(principal="billing", idempotency_key=key)
    again = await bus.dispatch(helpers.register(email=command.email, username=command.username), retry_meta)
    assert (again.aggregate_id, again.version, again.reply) == (first.aggregate_id, 1, first.reply)
    assert again.replay_of == first_meta.command_id
    assert len(db.users) == 1
    assert len(db.outbox) == 1
    [stored] = db.idempotency.values()
    assert (stored.scope, stored.command_id, stored.reply) == (
        IdempotencyScope("billing", "RegisterUser", key),
        first_meta.command_id,
        first.reply,
    )
    assert stored.expires_at == stored.created_at + timedelta(hours=1)
    succeeded, replayed = db.command_log
    assert (succeeded.outcome, succeeded.principal, succeeded.idempotency_key) == ("succeeded", "billing", key)
    assert (replayed.outcome, replayed.principal, replayed.idempotency_key) == ("replayed", "billing", key)
    assert (replayed.command_id, replayed.replay_of, replayed.event_ids) == (
        retry_meta.command_id,
        first_meta.command_id,
        (),
    )
    assert replayed.aggregate_id == str(first.aggregate_id)


async def test_the_same_key_with_another_request_is_invalid(bus, db):
    user_id = await registered(bus)
    key = helpers.key()
    await bus.dispatch(helpers.update(user_id, full_name="First"), helpers.meta(idempotency_key=key))
    with pytest.raises(errors.InvalidArgument) as exc_info:
        await bus.dispatch(helpers.update(user_id, full_name="Second"), helpers.meta(idempotency_key=key))
    assert exc_info.value.message == "the idempotency key was already used for a different request"
    assert [v.field for v in exc_info.value.violations] == ["idempotency-key"]
    assert db.users[user_id].full_name == "First"
    assert len(db.outbox) == 2
    rejected = db.command_log[-1]
    assert (rejected.outcome, rejected.status_code, rejected.idempotency_key) == ("rejected", "INVALID_ARGUMENT", key)


async def test_a_key_belongs_to_one_principal_and_one_command_type(bus, db):
    user_id = await registered(bus)
    key = helpers.key()
    first = await bus.dispatch(helpers.update(user_id), helpers.meta(principal="a", idempotency_key=key))
    second = await bus.dispatch(helpers.update(user_id), helpers.meta(principal="b", idempotency_key=key))
    third = await bus.dispatch(helpers.deactivate(user_id), helpers.meta(principal="a", idempotency_key=key))
    assert [first.version, second.version, third.version] == [2, 3, 4]
    assert len(db.idempotency) == 3


async def test_a_retry_after_success_gets_the_reply_even_though_the_version_moved_on(bus, db):
    user_id = await registered(bus)
    key = helpers.key()
    command = helpers.deactivate(user_id, expected_version=1)
    first = await bus.dispatch(command, helpers.meta(idempotency_key=key))
    # Run again, the command would fail twice over: the version is 2 and the user is inactive.
    again = await bus.dispatch(command, helpers.meta(idempotency_key=key))
    assert (again.version, again.reply) == (2, first.reply)
    assert len(db.outbox) == 2


async def test_a_key_in_use_by_a_running_command_is_a_conflict_after_the_retries(bus, db, sleeps):
    user_id = await registered(bus)
    key = helpers.key()
    running = InMemoryUnitOfWork(db, Deadline.after(5))
    async with running:
        assert await running.idempotency.try_lock(IdempotencyScope("anonymous", "UpdateUserProfile", key))
        meta = helpers.meta(idempotency_key=key)
        with pytest.raises(errors.Conflict, match="still in progress"):
            await bus.dispatch(helpers.update(user_id), meta)
    assert len(sleeps.delays) == 2
    assert db.users[user_id].version == 1
    failed = db.command_log[-1]
    assert (failed.command_id, failed.outcome, failed.status_code) == (meta.command_id, "failed", "ABORTED")
    # Once the holder is gone the key is free, and nothing was stored for it.
    result = await bus.dispatch(helpers.update(user_id), helpers.meta(idempotency_key=key))
    assert result.version == 2


async def test_a_rejected_command_stores_nothing_so_its_retry_is_evaluated_again(db, clock, sleeps):
    user_id = uuid.uuid4()
    bus = CommandBus(
        lambda deadline: InMemoryUnitOfWork(db, deadline),
        Dependencies(hasher=helpers.cheap_hasher(), clock=clock, new_id=lambda: user_id),
        sleep=sleeps,
    )
    key = helpers.key()
    with pytest.raises(errors.NotFound):
        await bus.dispatch(helpers.update(user_id, full_name="Later"), helpers.meta(idempotency_key=key))
    assert db.idempotency == {}
    await bus.dispatch(helpers.register(), helpers.meta())
    result = await bus.dispatch(helpers.update(user_id, full_name="Later"), helpers.meta(idempotency_key=key))
    assert (result.aggregate_id, result.version, result.replay_of) == (user_id, 2, None)
    assert db.users[user_id].full_name == "Later"


async def test_an_expired_key_is_forgotten(bus, db, clock):
    user_id = await registered(bus)
    key = helpers.key()
    first = await bus.dispatch(helpers.update(user_id), helpers.meta(idempotency_key=key))
    clock.now += timedelta(hours=1)
    again = await bus.dispatch(helpers.update(user_id), helpers.meta(idempotency_key=key))
    assert (first.version, again.version, again.replay_of) == (2, 3, None)
    [stored] = db.idempotency.values()
    assert stored.aggregate_version == 3
    assert stored.expires_at == clock.now + timedelta(hours=1)


async def test_without_a_key_nothing_is_stored(bus, db):
    user_id = await registered(bus)
    await bus.dispatch(helpers.update(user_id), helpers.meta())
    await bus.dispatch(helpers.update(user_id), helpers.meta())
    assert db.idempotency == {}
    assert db.users[user_id].version == 3
    assert {e.idempotency_key for e in db.command_log} == {""}


async def test_a_transient_conflict_is_retried_and_the_key_stored_once(bus, db, sleeps):
    db.commit_failures.append(errors.Conflict("serialization failure"))
    key = helpers.key()
    result = await bus.dispatch(helpers.register(), helpers.meta(idempotency_key=key))
    assert len(sleeps.delays) == 1
    assert len(db.idempotency) == 1
    assert next(iter(db.idempotency.values())).aggregate_version == result.version
    assert db.held_locks == set()


# --- expected versions -------------------------------------------------------------------


async def test_an_expected_version_that_matches_applies(bus, db):
    user_id = await registered(bus)
    result = await bus.dispatch(helpers.update(user_id, expected_version=1), helpers.meta())
    assert result.version == 2
    result = await bus.dispatch(helpers.deactivate(user_id, expected_version=2), helpers.meta())
    assert result.version == 3


@pytest.mark.parametrize("kind", ["update", "deactivate"])
async def test_a_stale_expected_version_fails_the_precondition_naming_the_current_one(bus, db, kind):
    user_id = await registered(bus)
    await bus.dispatch(helpers.update(user_id), helpers.meta())
    command = (
        helpers.update(user_id, expected_version=1)
        if kind == "update"
        else helpers.deactivate(user_id, expected_version=1)
    )
    with pytest.raises(errors.FailedPrecondition) as exc_info:
        await bus.dispatch(command, helpers.meta())
    assert exc_info.value.message == f"user {user_id} is at version 2, not the expected version 1"
    assert db.users[user_id].version == 2
    assert db.users[user_id].active
    assert db.command_log[-1].summary["expected_version"] == 1


# --- cleanup -----------------------------------------------------------------------------


def stored_reply(key: str, expires_at: datetime) -> StoredReply:
    return StoredReply(
        scope=IdempotencyScope("svc", "RegisterUser", key),
        fingerprint=b"\0" * 32,
        command_id=uuid.uuid4(),
        aggregate_id=str(uuid.uuid4()),
        aggregate_version=1,
        reply=b"reply",
        created_at=expires_at - timedelta(days=1),
        expires_at=expires_at,
    )


async def test_cleanup_deletes_only_expired_keys_whose_lock_is_free(db):
    for key, expires_at in [("old", NOW - timedelta(seconds=1)), ("due", NOW), ("live", NOW + timedelta(seconds=1))]:
        db.idempotency[("svc", "RegisterUser", key)] = stored_reply(key, expires_at)
    held = stored_reply("held", NOW - timedelta(hours=1))
    db.idempotency[("svc", "RegisterUser", "held")] = held
    db.held_locks.add(held.scope.lock_id)
    cleanup = ExpiredKeyCleanup(InMemoryExpiredKeyPurger(db), interval_s=60, batch_size=10, clock=lambda: NOW)
    assert await cleanup.run_once() == 2
    assert sorted(k for _, _, k in db.idempotency) == ["held", "live"]
    db.held_locks.clear()
    assert await cleanup.run_once() == 1
    assert [k for _, _, k in db.idempotency] == ["live"]


async def test_cleanup_works_through_a_backlog_in_batches(db):
    for i in range(25):
        db.idempotency[("svc", "RegisterUser", f"k{i}")] = stored_reply(f"k{i}", NOW - timedelta(minutes=i))
    calls: list[int] = []
    purger = InMemoryExpiredKeyPurger(db)

    class Counting(InMemoryExpiredKeyPurger):
        async def purge(self, now, limit):
            deleted = await purger.purge(now, limit)
            calls.append(deleted)
            return deleted

    cleanup = ExpiredKeyCleanup(Counting(db), interval_s=60, batch_size=10, clock=lambda: NOW)
    assert await cleanup.run_once() == 25
    assert calls == [10, 10, 5]
    assert db.idempotency == {}


async def test_the_cleanup_loop_survives_a_failed_round_and_stops_when_cancelled(db):
    db.idempotency[("svc", "RegisterUser", "old")] = stored_reply("old", NOW - timedelta(seconds=1))
    real = InMemoryExpiredKeyPurger(db)
    attempts: list[str] = []

    class FailsOnce(InMemoryExpiredKeyPurger):
        async def purge(self, now, limit):
            if not attempts:
                attempts.append("failed")
                raise OSError("database restarting")
            attempts.append("ran")
            return await real.purge(now, limit)

    second_round = asyncio.Event()
    waits: list[float] = []

    async def sleep(delay: float) -> None:
        waits.append(delay)
        if len(waits) == 2:
            second_round.set()
            await asyncio.Event().wait()  # parked here until cancelled

    cleanup = ExpiredKeyCleanup(FailsOnce(db), interval_s=7.5, batch_size=10, clock=lambda: NOW, sleep=sleep)
    task = asyncio.create_task(cleanup.run())
    await asyncio.wait_for(second_round.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert attempts == ["failed", "ran"]
    assert waits == [7.5, 7.5]
    assert db.idempotency == {}


def test_the_retention_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        CommandBus(
            lambda d: InMemoryUnitOfWork(InMemoryDatabase(), d),
            Dependencies(hasher=helpers.cheap_hasher()),
            idempotency_retention=timedelta(0),
        )


async def test_put_refuses_to_replace_a_live_reply(db):
    live = stored_reply("k", NOW + timedelta(hours=1))
    db.idempotency[("svc", "RegisterUser", "k")] = live
    twin = replace(live, created_at=NOW, command_id=uuid.uuid4())
    async with InMemoryUnitOfWork(db, Deadline.after(5)) as uow:
        with pytest.raises(errors.Conflict):
            await uow.idempotency.put(twin)
    assert db.idempotency[("svc", "RegisterUser", "k")] is live
