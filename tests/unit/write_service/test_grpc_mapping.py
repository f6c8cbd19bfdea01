"""The servicer's own logic: correlation ids and deadlines taken from the call."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import pytest

from shared_kernel.contracts.errors import FailedPrecondition, InvalidArgument
from shared_kernel.platform.security.authn import reset_principal, set_principal
from tessera.users.v1 import user_command_service_pb2 as pb
from tests.unit.write_service import helpers
from write_service.adapters.memory import InMemoryDatabase, InMemoryUnitOfWork
from write_service.entrypoints.command_servicer import correlation_violation
from write_service.entrypoints.users import UserCommandServicer
from write_service.service_layer.command_steps import Dependencies
from write_service.service_layer.messagebus import CommandBus


class FakeContext:
    def __init__(self, metadata: Sequence[tuple[str, str]] = (), time_remaining: float | None = None) -> None:
        self._metadata = tuple(metadata)
        self._remaining = time_remaining

    def invocation_metadata(self):
        return self._metadata

    def time_remaining(self):
        return self._remaining


@pytest.mark.parametrize("value", ["a", "req-42", "x" * 128, "trace id with spaces"])
def test_good_correlation_ids(value):
    assert correlation_violation(value) is None


@pytest.mark.parametrize("value", ["x" * 129, "tab\there", "naïve", "nul\x00"])
def test_bad_correlation_ids(value):
    violation = correlation_violation(value)
    assert violation is not None
    assert violation.field == "x-correlation-id"


@pytest.fixture
def db():
    return InMemoryDatabase()


@pytest.fixture
def servicer(db):
    bus = CommandBus(lambda d: InMemoryUnitOfWork(db, d), Dependencies(hasher=helpers.cheap_hasher()))
    return UserCommandServicer(bus, max_command_s=3.0)


def request() -> pb.RegisterUserRequest:
    token = helpers.suffix()
    return pb.RegisterUserRequest(
        email=f"a{token}@example.com", username=f"u{token}", password=helpers.PASSWORD, full_name="A"
    )


async def test_the_correlation_header_is_used(servicer, db):
    await servicer.RegisterUser(request(), FakeContext([("x-correlation-id", "req-7")]))
    assert db.outbox[0].correlation_id == "req-7"
    assert db.command_log[0].correlation_id == "req-7"


async def test_without_a_header_the_command_id_correlates(servicer, db):
    reply = await servicer.RegisterUser(request(), FakeContext())
    entry = db.command_log[0]
    assert entry.correlation_id == str(entry.command_id)
    assert db.outbox[0].causation_id == str(entry.command_id)
    assert reply.user_id == entry.aggregate_id
    assert reply.version == 1


async def test_a_bad_header_is_reported_with_the_fields(servicer, db):
    bad = pb.RegisterUserRequest(email="nope", username="u" + helpers.suffix(), password="x", full_name="A")
    with pytest.raises(InvalidArgument) as exc_info:
        await servicer.RegisterUser(bad, FakeContext([("x-correlation-id", "x" * 200)]))
    assert {v.field for v in exc_info.value.violations} == {"x-correlation-id", "email", "password"}
    assert db.command_log == []


def test_the_deadline_is_the_callers_capped_by_the_server(servicer):
    meta, _ = servicer._meta(FakeContext(time_remaining=1.0))
    assert 0.9 < meta.deadline.remaining() <= 1.0
    meta, _ = servicer._meta(FakeContext(time_remaining=60.0))
    assert 2.9 < meta.deadline.remaining() <= 3.0
    meta, _ = servicer._meta(FakeContext(time_remaining=None))
    assert 2.9 < meta.deadline.remaining() <= 3.0
    assert isinstance(meta.command_id, uuid.UUID)


def test_the_idempotency_key_and_the_principal_come_from_the_call(servicer):
    token = set_principal("billing-service")
    try:
        meta, violations = servicer._meta(FakeContext([("idempotency-key", "order-42")]))
    finally:
        reset_principal(token)
    assert violations == []
    assert (meta.principal, meta.idempotency_key) == ("billing-service", "order-42")
    meta, _ = servicer._meta(FakeContext())
    assert (meta.principal, meta.idempotency_key) == ("anonymous", None)


@pytest.mark.parametrize(
    ("metadata", "description"),
    [
        ([("idempotency-key", "")], "1 to 255 printable ASCII"),
        ([("idempotency-key", "k" * 256)], "1 to 255 printable ASCII"),
        ([("idempotency-key", "a"), ("idempotency-key", "b")], "at most once"),
    ],
)
async def test_a_bad_idempotency_header_is_reported_with_the_fields(servicer, db, metadata, description):
    bad = pb.RegisterUserRequest(
        email="nope", username="u" + helpers.suffix(), password=helpers.PASSWORD, full_name="A"
    )
    with pytest.raises(InvalidArgument) as exc_info:
        await servicer.RegisterUser(bad, FakeContext(metadata))
    found = {v.field: v.description for v in exc_info.value.violations}
    assert set(found) == {"idempotency-key", "email"}
    assert description in found["idempotency-key"]
    assert db.command_log == []


async def test_a_keyed_retry_gets_the_same_reply_message(servicer, db):
    context = FakeContext([("idempotency-key", "k-1")])
    message = request()
    first = await servicer.RegisterUser(message, context)
    again = await servicer.RegisterUser(message, context)
    assert again == first
    assert again.SerializeToString() == first.SerializeToString()
    assert len(db.outbox) == 1
    [stored] = db.idempotency.values()
    assert stored.reply == first.SerializeToString(deterministic=True)


async def test_expected_version_is_passed_only_when_set(servicer, db):
    reply = await servicer.RegisterUser(request(), FakeContext())
    updated = await servicer.UpdateUserProfile(
        pb.UpdateUserProfileRequest(user_id=reply.user_id, full_name="B", expected_version=1), FakeContext()
    )
    assert updated.version == 2
    with pytest.raises(FailedPrecondition, match="at version 2, not the expected version 1"):
        await servicer.DeactivateUser(
            pb.DeactivateUserRequest(user_id=reply.user_id, reason="r", expected_version=1), FakeContext()
        )
    deactivated = await servicer.DeactivateUser(
        pb.DeactivateUserRequest(user_id=reply.user_id, reason="r"), FakeContext()
    )
    assert deactivated.version == 3
    with pytest.raises(InvalidArgument) as exc_info:
        await servicer.UpdateUserProfile(
            pb.UpdateUserProfileRequest(user_id=reply.user_id, full_name="C", expected_version=0), FakeContext()
        )
    assert [v.field for v in exc_info.value.violations] == ["expected_version"]
