"""The upcasting chain: older payloads read as the current version, newer ones refused."""

from __future__ import annotations

import uuid

import pytest

from read_service.projections.base import PoisonEvent
from read_service.projections.support import decode
from read_service.upcasting import (
    CURRENT,
    STEPS,
    UnsupportedSchemaVersion,
    check_version,
    current_version,
    upcast,
)
from tessera.events.v1.envelope_pb2 import EventEnvelope
from tessera.users.v1.events_pb2 import UserDeactivated, UserRegistered
from write_service.domain.users import USER_REGISTERED_SCHEMA_VERSION

REGISTERED = UserRegistered.DESCRIPTOR.full_name


def _envelope(payload: UserRegistered, schema_version: int) -> EventEnvelope:
    return EventEnvelope(
        event_type=REGISTERED,
        schema_version=schema_version,
        aggregate_id=payload.user_id,
        payload=payload.SerializeToString(),
    )


def test_the_write_side_emits_the_version_the_read_side_reads() -> None:
    assert current_version(REGISTERED) == USER_REGISTERED_SCHEMA_VERSION == 2


def test_a_type_that_never_changed_is_at_version_1() -> None:
    assert current_version(UserDeactivated.DESCRIPTOR.full_name) == 1
    check_version(UserDeactivated.DESCRIPTOR.full_name, 1)
    with pytest.raises(UnsupportedSchemaVersion):
        check_version(UserDeactivated.DESCRIPTOR.full_name, 2)


def test_every_type_has_one_step_per_version_it_passed() -> None:
    assert all(CURRENT[event_type] == len(steps) + 1 for event_type, steps in STEPS.items())


def test_a_version_1_user_registered_reads_as_version_2() -> None:
    user_id = str(uuid.uuid4())
    old = UserRegistered(user_id=user_id, email="a@b.c", username="ada", full_name="Ada Lovelace")
    new = UserRegistered(user_id=user_id, email="a@b.c", username="ada", display_name="Ada Lovelace")
    assert decode(UserRegistered, _envelope(old, 1)) == new
    assert decode(UserRegistered, _envelope(new, 2)) == new


def test_a_current_payload_is_returned_as_it_is() -> None:
    payload = UserRegistered(user_id="u", display_name="x")
    assert upcast(REGISTERED, 2, payload) is payload


@pytest.mark.parametrize("schema_version", [0, 3, 1_000])
def test_a_version_this_code_does_not_know_is_poison(schema_version: int) -> None:
    payload = UserRegistered(user_id=str(uuid.uuid4()), display_name="x")
    with pytest.raises(PoisonEvent, match=f"schema version {schema_version} is not supported"):
        decode(UserRegistered, _envelope(payload, schema_version))
