"""The User aggregate's rules and the events it records."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from shared_kernel.contracts.errors import FailedPrecondition
from tessera.users.v1 import events_pb2
from write_service.domain import users

NOW = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def new_user() -> users.User:
    return users.User.register(
        user_id=uuid.uuid4(),
        email="Ada@Example.com",
        username="Ada",
        password_hash="$argon2id$v=19$m=8,t=1,p=1$c2FsdA$aGFzaA",
        full_name="Ada Lovelace",
        now=NOW,
    )


def test_register_starts_at_version_one_with_user_registered():
    user = new_user()
    assert user.version == 1
    assert user.stored_version == 0
    assert user.active
    assert user.created_at == user.updated_at == NOW
    [event] = user.pending_events
    assert event.aggregate_type == "user"
    assert event.aggregate_id == str(user.id)
    assert event.aggregate_version == 1
    assert event.occurred_at == NOW
    # Version 2: the name in display_name, full_name left empty (decision 0030).
    assert event.schema_version == 2
    assert event.event_type == "tessera.users.v1.UserRegistered"
    assert isinstance(event.payload, events_pb2.UserRegistered)
    assert event.payload.email == "Ada@Example.com"
    assert event.payload.username == "Ada"
    assert (event.payload.display_name, event.payload.full_name) == ("Ada Lovelace", "")
    assert event.payload.registered_at.ToDatetime(tzinfo=UTC) == NOW


def test_the_event_never_carries_the_password_hash():
    user = new_user()
    [event] = user.pending_events
    assert b"argon2" not in event.payload.SerializeToString()
    assert "argon2" not in repr(user)


def test_update_profile_records_the_full_profile():
    user = new_user()
    later = NOW + timedelta(minutes=1)
    user.update_profile(full_name="Ada King", bio="Countess", avatar_url="https://e.com/a.png", now=later)
    assert (user.full_name, user.bio, user.avatar_url, user.version) == (
        "Ada King",
        "Countess",
        "https://e.com/a.png",
        2,
    )
    assert user.updated_at == later
    event = user.pending_events[-1]
    assert event.aggregate_version == 2
    assert isinstance(event.payload, events_pb2.UserProfileUpdated)
    assert event.payload.bio == "Countess"


def test_deactivate_once():
    user = new_user()
    user.deactivate(reason="left", now=NOW)
    assert not user.active
    assert user.deactivation_reason == "left"
    assert user.version == 2
    assert isinstance(user.pending_events[-1].payload, events_pb2.UserDeactivated)
    with pytest.raises(FailedPrecondition, match="already deactivated"):
        user.deactivate(reason="again", now=NOW)
    assert user.version == 2


def test_a_deactivated_user_is_frozen():
    user = new_user()
    user.deactivate(reason="left", now=NOW)
    with pytest.raises(FailedPrecondition, match="deactivated"):
        user.update_profile(full_name="x", bio="", avatar_url="", now=NOW)
    assert user.full_name == "Ada Lovelace"
    assert len(user.pending_events) == 2


def test_each_event_bumps_the_version_by_one():
    user = new_user()
    for _ in range(3):
        user.update_profile(full_name="n", bio="", avatar_url="", now=NOW)
    assert [e.aggregate_version for e in user.pending_events] == [1, 2, 3, 4]


def test_duplicate_errors_name_their_field():
    assert users.email_taken().field == "email"
    assert "email" in users.email_taken().message
    assert users.username_taken().field == "username"
    assert "username" in users.username_taken().message
