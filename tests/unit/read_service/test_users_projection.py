"""The users projection as a pure function: envelope + prior state -> ops."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from google.protobuf.message import Message

from read_service.keys import SortField, Subset, UserKeys, index_member, member_user_id
from read_service.projections.base import ALLOWED_COMMANDS, Effect, PoisonEvent
from read_service.projections.users import UsersProjection
from read_service.search import grams
from tessera.events.v1.envelope_pb2 import EventEnvelope
from tessera.users.v1.events_pb2 import UserDeactivated, UserProfileUpdated, UserRegistered
from tessera.users.v1.user_query_service_pb2 import UserView

KEYS = UserKeys("unit:")
USER_ID = str(uuid.uuid4())
REGISTERED_AT = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
REGISTERED_AT_MICROS = int(REGISTERED_AT.timestamp()) * 1_000_000 + REGISTERED_AT.microsecond
UPDATED_AT = datetime(2024, 6, 1, 8, 30, tzinfo=UTC)


def envelope(payload: Message, version: int, position: int, user_id: str = USER_ID) -> EventEnvelope:
    env = EventEnvelope(
        event_id=str(uuid.uuid4()),
        event_type=payload.DESCRIPTOR.full_name,
        schema_version=1,
        aggregate_type="user",
        aggregate_id=user_id,
        aggregate_version=version,
        position=position,
        payload=payload.SerializeToString(),
    )
    env.occurred_at.FromDatetime(REGISTERED_AT)
    return env


def registered(email: str = "Ada@Example.com", username: str = "AdaL") -> EventEnvelope:
    event = UserRegistered(user_id=USER_ID, email=email, username=username, full_name="Ada Lovelace")
    event.registered_at.FromDatetime(REGISTERED_AT)
    return envelope(event, 1, 1)


def profile_updated(version: int = 2) -> EventEnvelope:
    event = UserProfileUpdated(user_id=USER_ID, full_name="Ada King", bio="Analyst", avatar_url="https://a/b.png")
    event.updated_at.FromDatetime(UPDATED_AT)
    return envelope(event, version, 2)


def deactivated(version: int = 2) -> EventEnvelope:
    event = UserDeactivated(user_id=USER_ID, reason="left")
    event.deactivated_at.FromDatetime(UPDATED_AT)
    return envelope(event, version, 3)


@pytest.fixture
def projection() -> UsersProjection:
    return UsersProjection(KEYS)


def view_after(effect: Effect) -> UserView:
    raw = effect.state[KEYS.view(USER_ID)]
    assert raw is not None
    return UserView.FromString(raw)


def registered_state(projection: UsersProjection) -> dict[str, bytes | None]:
    return dict(projection.project(registered(), {}).state)


def test_registered_writes_view_email_index_sorted_indexes_and_counters(projection):
    effect = projection.project(registered(), {})

    view = view_after(effect)
    assert view.user_id == USER_ID
    assert view.email == "Ada@Example.com"
    assert view.username == "AdaL"
    assert view.full_name == "Ada Lovelace"
    assert view.active is True
    assert view.version == 1
    assert view.created_at.ToDatetime(tzinfo=UTC) == REGISTERED_AT
    assert view.updated_at.ToDatetime(tzinfo=UTC) == REGISTERED_AT

    ops = list(effect.ops)
    assert ("SET", KEYS.view(USER_ID), effect.state[KEYS.view(USER_ID)]) in ops
    assert ("HSET", KEYS.by_email, "ada@example.com", USER_ID) in ops
    for sort in SortField:
        member = index_member(sort, view)
        assert ("ZADD", KEYS.index(sort, Subset.ALL), 0, member) in ops
        assert ("ZADD", KEYS.index(sort, Subset.ACTIVE), 0, member) in ops
        assert not any(op[1] == KEYS.index(sort, Subset.INACTIVE) for op in ops)
    assert ("HINCRBY", KEYS.stats, "users", 1) in ops
    assert ("HINCRBY", KEYS.stats, "active_users", 1) in ops
    searchable = grams(["Ada@Example.com", "AdaL", "Ada Lovelace"])
    created = REGISTERED_AT_MICROS
    tri_ops = [op for op in ops if str(op[1]).startswith(KEYS.trigram(""))]
    # Each trigram set is a sorted set of ids (16 bytes each) scored by the creation time (the walk's order).
    assert {op[1] for op in tri_ops} == {KEYS.trigram(g) for g in searchable}
    assert {(op[0], op[2], op[3]) for op in tri_ops} == {("ZADD", created, uuid.UUID(USER_ID).bytes)}
    assert {"ada", "@ex", "a l", "ace"} <= searchable
    assert all(str(op[0]) in ALLOWED_COMMANDS for op in ops)


def test_registered_needs_no_prior_state(projection):
    assert projection.state_keys(registered()) == ()


def test_index_members_sort_case_insensitively_and_end_with_the_id(projection):
    view = view_after(projection.project(registered(), {}))
    assert index_member(SortField.EMAIL, view).startswith(b"ada@example.com\x00")
    assert index_member(SortField.USERNAME, view).startswith(b"adal\x00")
    assert member_user_id(index_member(SortField.CREATED_AT, view)) == USER_ID
    # Prefixes sort first, so "ada" + anything orders before "adam".
    shorter = UserView(user_id=USER_ID, email="ada@x")
    longer = UserView(user_id="0" * 36, email="ada@xb")
    assert index_member(SortField.EMAIL, shorter) < index_member(SortField.EMAIL, longer)


def test_profile_updated_reads_the_view_and_rewrites_only_it(projection):
    env = profile_updated()
    assert projection.state_keys(env) == (KEYS.view(USER_ID),)

    effect = projection.project(env, registered_state(projection))

    view = view_after(effect)
    assert (view.full_name, view.bio, view.avatar_url) == ("Ada King", "Analyst", "https://a/b.png")
    assert view.email == "Ada@Example.com"
    assert view.version == 2
    assert view.created_at.ToDatetime(tzinfo=UTC) == REGISTERED_AT
    assert view.updated_at.ToDatetime(tzinfo=UTC) == UPDATED_AT
    # The search index moves from the old full name's trigrams to the new one's.
    assert effect.ops[0] == ("SET", KEYS.view(USER_ID), effect.state[KEYS.view(USER_ID)])
    assert {op[0] for op in effect.ops[1:]} == {"ZREM", "ZADD"}
    before = grams(["Ada@Example.com", "AdaL", "Ada Lovelace"])
    after = grams(["Ada@Example.com", "AdaL", "Ada King"])
    assert {op[1] for op in effect.ops if op[0] == "ZREM"} == {KEYS.trigram(g) for g in before - after}
    assert {op[1] for op in effect.ops if op[0] == "ZADD"} == {KEYS.trigram(g) for g in after - before}
    assert all(op[2] == uuid.UUID(USER_ID).bytes for op in effect.ops if op[0] == "ZREM")
    assert all(op[2:] == (REGISTERED_AT_MICROS, uuid.UUID(USER_ID).bytes) for op in effect.ops if op[0] == "ZADD")
    assert KEYS.trigram("ada") not in {op[1] for op in effect.ops}  # still in the e-mail and username


def test_deactivated_moves_the_user_to_the_inactive_indexes(projection):
    state = registered_state(projection)
    effect = projection.project(deactivated(), state)

    view = view_after(effect)
    assert view.active is False
    assert view.deactivation_reason == "left"
    assert view.version == 2
    ops = list(effect.ops)
    for sort in SortField:
        member = index_member(sort, view)
        assert ("ZREM", KEYS.index(sort, Subset.ACTIVE), member) in ops
        assert ("ZADD", KEYS.index(sort, Subset.INACTIVE), 0, member) in ops
    assert ("HINCRBY", KEYS.stats, "active_users", -1) in ops


def test_deactivating_an_inactive_user_does_not_touch_indexes_or_counters(projection):
    state = registered_state(projection)
    state.update(projection.project(deactivated(2), state).state)

    effect = projection.project(deactivated(3), state)

    assert [op[0] for op in effect.ops] == ["SET"]
    assert view_after(effect).version == 3


@pytest.mark.parametrize("make", [profile_updated, deactivated])
def test_events_for_an_unknown_user_change_nothing(projection, make):
    assert projection.project(make(), {}) == Effect()


def test_an_event_that_does_not_advance_the_version_changes_nothing(projection):
    state = registered_state(projection)
    assert projection.project(profile_updated(version=1), state) == Effect()


def test_unknown_event_types_only_advance_the_checkpoint(projection):
    env = envelope(UserView(user_id=USER_ID), 1, 1)
    env.event_type = "tessera.users.v1.SomethingNew"
    assert projection.state_keys(env) == ()
    assert projection.project(env, {}) == Effect()


def test_an_undecodable_payload_is_poison(projection):
    env = registered()
    env.payload = b"\xff\xff\xff"
    with pytest.raises(PoisonEvent):
        projection.project(env, {})


@pytest.mark.parametrize("schema_version", [0, 3, 99])
def test_an_unknown_schema_version_is_poison(projection, schema_version):
    env = registered()
    env.schema_version = schema_version
    with pytest.raises(PoisonEvent, match="schema version"):
        projection.project(env, {})


def test_a_payload_for_another_aggregate_is_poison(projection):
    env = registered()
    env.aggregate_id = str(uuid.uuid4())
    with pytest.raises(PoisonEvent):
        projection.project(env, {})


def test_a_missing_payload_timestamp_falls_back_to_occurred_at(projection):
    event = UserRegistered(user_id=USER_ID, email="a@b.c", username="a", full_name="A")
    view = view_after(projection.project(envelope(event, 1, 1), {}))
    assert view.created_at.ToDatetime(tzinfo=UTC) == REGISTERED_AT
