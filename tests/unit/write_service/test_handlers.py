"""Handlers and the command bus over the in-memory unit of work."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from shared_kernel.contracts import errors
from tessera.users.v1 import events_pb2
from tests.unit.write_service import helpers
from write_service.adapters.memory import InMemoryDatabase, InMemoryUnitOfWork
from write_service.service_layer.command_steps import CommandMeta, Dependencies
from write_service.service_layer.deadline import Deadline
from write_service.service_layer.messagebus import CommandBus
from write_service.service_layer.ports import UnitOfWork

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@pytest.fixture
def db() -> InMemoryDatabase:
    return InMemoryDatabase()


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def bus(db, sleeps) -> CommandBus:
    return CommandBus(
        lambda deadline: InMemoryUnitOfWork(db, deadline),
        Dependencies(hasher=helpers.cheap_hasher(), clock=lambda: NOW),
        max_attempts=3,
        retry_backoff_s=0.01,
        sleep=sleeps,
    )


async def registered(bus: CommandBus, **kwargs) -> uuid.UUID:
    result = await bus.dispatch(helpers.register(**kwargs), helpers.meta())
    return result.aggregate_id


async def test_register_commits_state_event_and_log_together(bus, db):
    command = helpers.register(email="Ada@Example.com", username="Ada")
    meta = helpers.meta(correlation_id="req-1")
    result = await bus.dispatch(command, meta)

    assert result.version == 1
    user = db.users[result.aggregate_id]
    assert (user.email, user.username, user.version, user.active) == ("Ada@Example.com", "Ada", 1, True)
    assert user.password_hash.startswith("$argon2id$")
    assert user.pending_events == []

    [record] = db.outbox
    assert record.correlation_id == "req-1"
    assert record.causation_id == str(meta.command_id)
    assert record.event.aggregate_id == str(result.aggregate_id)
    assert record.event.aggregate_version == 1
    assert isinstance(record.event.payload, events_pb2.UserRegistered)

    [entry] = db.command_log
    assert entry.command_id == meta.command_id
    assert entry.outcome == "succeeded"
    assert entry.status_code == "OK"
    assert entry.command_type == "RegisterUser"
    assert entry.aggregate_id == str(result.aggregate_id)
    assert entry.event_ids == (record.event.event_id,)
    assert entry.correlation_id == "req-1"
    assert entry.summary == {"email": "Ada@Example.com", "username": "Ada"}
    assert helpers.PASSWORD not in repr(entry)
    assert db.commits == 1


@pytest.mark.parametrize(
    ("email", "username", "field"),
    [("ADA@example.COM", "someone_else", "email"), ("other@example.com", "aDa", "username")],
)
async def test_duplicates_are_rejected_case_insensitively(bus, db, email, username, field):
    await registered(bus, email="Ada@Example.com", username="Ada")
    meta = helpers.meta()
    with pytest.raises(errors.AlreadyExists) as exc_info:
        await bus.dispatch(helpers.register(email=email, username=username), meta)
    assert exc_info.value.field == field
    assert field in exc_info.value.message
    assert len(db.users) == 1
    assert len(db.outbox) == 1
    rejected = db.command_log[-1]
    assert rejected.command_id == meta.command_id
    assert (rejected.outcome, rejected.status_code) == ("rejected", "ALREADY_EXISTS")
    assert rejected.event_ids == ()
    assert field in rejected.error_message


async def test_update_and_deactivate_bump_the_version(bus, db):
    user_id = await registered(bus)
    result = await bus.dispatch(helpers.update(user_id, full_name="New", bio="b\nc"), helpers.meta())
    assert (result.aggregate_id, result.version) == (user_id, 2)
    result = await bus.dispatch(helpers.deactivate(user_id, reason="done"), helpers.meta())
    assert result.version == 3
    user = db.users[user_id]
    assert (user.full_name, user.bio, user.active, user.deactivation_reason) == ("New", "b\nc", False, "done")
    assert [r.event.aggregate_version for r in db.outbox] == [1, 2, 3]
    assert [r.event.event_type.rsplit(".", 1)[1] for r in db.outbox] == [
        "UserRegistered",
        "UserProfileUpdated",
        "UserDeactivated",
    ]
    assert [e.outcome for e in db.command_log] == ["succeeded"] * 3


async def test_unknown_user_is_not_found_and_logged(bus, db):
    missing = uuid.uuid4()
    with pytest.raises(errors.NotFound):
        await bus.dispatch(helpers.deactivate(missing), helpers.meta())
    [entry] = db.command_log
    assert (entry.outcome, entry.status_code, entry.aggregate_id) == ("rejected", "NOT_FOUND", str(missing))


async def test_deactivating_twice_fails_the_precondition(bus, db):
    user_id = await registered(bus)
    await bus.dispatch(helpers.deactivate(user_id), helpers.meta())
    with pytest.raises(errors.FailedPrecondition, match="already deactivated"):
        await bus.dispatch(helpers.deactivate(user_id), helpers.meta())
    assert db.users[user_id].version == 2
    assert db.command_log[-1].status_code == "FAILED_PRECONDITION"


async def test_a_deactivated_profile_cannot_change(bus, db):
    user_id = await registered(bus)
    await bus.dispatch(helpers.deactivate(user_id), helpers.meta())
    with pytest.raises(errors.FailedPrecondition):
        await bus.dispatch(helpers.update(user_id), helpers.meta())
    assert len(db.outbox) == 2


async def test_transient_conflicts_are_retried(bus, db, sleeps):
    db.commit_failures.extend([errors.Conflict("serialization failure"), errors.Conflict("deadlock")])
    result = await bus.dispatch(helpers.register(), helpers.meta())
    assert result.version == 1
    assert len(sleeps.delays) == 2
    # Exponential backoff with ±50 % jitter around 10 ms, then 20 ms.
    assert 0.005 <= sleeps.delays[0] <= 0.015
    assert 0.01 <= sleeps.delays[1] <= 0.03
    assert len(db.users) == 1
    assert len(db.outbox) == 1


async def test_retries_are_bounded_then_conflict(bus, db, sleeps):
    db.commit_failures.extend([errors.Conflict("again")] * 3)
    meta = helpers.meta()
    with pytest.raises(errors.Conflict):
        await bus.dispatch(helpers.register(), meta)
    assert len(sleeps.delays) == 2
    assert db.users == {}
    [entry] = db.command_log
    assert (entry.command_id, entry.outcome, entry.status_code) == (meta.command_id, "failed", "ABORTED")


async def test_no_retry_when_the_deadline_cannot_cover_the_backoff(db, sleeps):
    # A first backoff of at least 5 s (10 s ± 50%) against 5 s left: never worth waiting for,
    # however slow the machine (a tiny deadline instead could expire before the commit).
    bus = CommandBus(
        lambda deadline: InMemoryUnitOfWork(db, deadline),
        Dependencies(hasher=helpers.cheap_hasher(), clock=lambda: NOW),
        retry_backoff_s=10.0,
        sleep=sleeps,
    )
    db.commit_failures.append(errors.Conflict("again"))
    with pytest.raises(errors.Conflict):
        await bus.dispatch(helpers.register(), helpers.meta(seconds=5.0))
    assert sleeps.delays == []


async def test_an_expired_deadline_is_unavailable_and_not_logged(bus, db):
    meta = CommandMeta(uuid.uuid4(), "c", NOW, Deadline.after(0))
    with pytest.raises(errors.Unavailable):
        await bus.dispatch(helpers.deactivate(uuid.uuid4()), meta)
    assert db.command_log == []


async def test_a_bug_is_logged_as_failed_without_its_text(db):
    class Broken(InMemoryUnitOfWork):
        async def log_command(self, entry):
            if entry.outcome == "succeeded":
                raise RuntimeError("secret detail")
            await super().log_command(entry)

    bus = CommandBus(lambda d: Broken(db, d), Dependencies(hasher=helpers.cheap_hasher()))
    with pytest.raises(RuntimeError):
        await bus.dispatch(helpers.register(), helpers.meta())
    [entry] = db.command_log
    assert (entry.outcome, entry.status_code, entry.error_message) == ("failed", "INTERNAL", "RuntimeError")
    assert db.users == {}


async def test_a_failing_rejection_log_never_masks_the_error(db):
    def factory(deadline: Deadline) -> UnitOfWork:
        uow = InMemoryUnitOfWork(db, deadline)
        db.commit_failures.append(OSError("log store down"))
        return uow

    bus = CommandBus(factory, Dependencies(hasher=helpers.cheap_hasher()))
    with pytest.raises(errors.NotFound):
        await bus.dispatch(helpers.deactivate(uuid.uuid4()), helpers.meta())
    assert db.command_log == []


async def test_each_command_gets_its_own_unit_of_work_per_attempt(db):
    made: list[InMemoryUnitOfWork] = []

    def factory(deadline: Deadline) -> UnitOfWork:
        made.append(InMemoryUnitOfWork(db, deadline))
        return made[-1]

    db.commit_failures.append(errors.Conflict("once"))

    async def no_sleep(_: float) -> None:
        return None

    bus = CommandBus(factory, Dependencies(hasher=helpers.cheap_hasher()), sleep=no_sleep)
    await bus.dispatch(helpers.register(), helpers.meta())
    assert len(made) == 2
    assert [u.committed for u in made] == [False, True]


def test_the_bus_needs_one_attempt():
    with pytest.raises(ValueError, match="at least 1"):
        CommandBus(
            lambda d: InMemoryUnitOfWork(InMemoryDatabase(), d),
            Dependencies(hasher=helpers.cheap_hasher()),
            max_attempts=0,
        )
