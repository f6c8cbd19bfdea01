"""The users projection: user events -> UserView, e-mail index, sorted list indexes and counters."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp

from read_service.keys import SortField, Subset, UserKeys, email_key, index_member
from read_service.projections.base import Effect, Op, PoisonEvent
from tessera.events.v1.envelope_pb2 import EventEnvelope
from tessera.users.v1.events_pb2 import UserDeactivated, UserProfileUpdated, UserRegistered
from tessera.users.v1.user_query_service_pb2 import UserView

logger = logging.getLogger(__name__)

# The payload schema versions this projection understands, per event type.
_SCHEMA_VERSION = 1

_REGISTERED = UserRegistered.DESCRIPTOR.full_name
_PROFILE_UPDATED = UserProfileUpdated.DESCRIPTOR.full_name
_DEACTIVATED = UserDeactivated.DESCRIPTOR.full_name

M = TypeVar("M", bound=Message)

# Event types whose effect depends on the user's current view.
_NEEDS_VIEW = frozenset({_PROFILE_UPDATED, _DEACTIVATED})


def _canonical_user_id(envelope: EventEnvelope) -> str:
    try:
        return str(uuid.UUID(envelope.aggregate_id))
    except ValueError as exc:
        raise PoisonEvent(f"aggregate_id {envelope.aggregate_id!r} is not a UUID") from exc


def _decode(message_type: type[M], envelope: EventEnvelope) -> M:
    if envelope.schema_version != _SCHEMA_VERSION:
        raise PoisonEvent(f"{envelope.event_type} schema version {envelope.schema_version} is not supported")
    try:
        payload = message_type.FromString(envelope.payload)
    except DecodeError as exc:
        raise PoisonEvent(f"payload of {envelope.event_type} does not decode") from exc
    user_id = getattr(payload, "user_id", "")
    if user_id.lower() != envelope.aggregate_id.lower():
        raise PoisonEvent(f"payload user_id {user_id!r} differs from aggregate_id {envelope.aggregate_id!r}")
    return payload


def _time_or_occurred(value: Timestamp, envelope: EventEnvelope) -> Timestamp:
    # An unset payload timestamp falls back to the envelope's, so a view never says 1970.
    return value if value.seconds or value.nanos else envelope.occurred_at


class UsersProjection:
    """Maintains the users read model described in read_service.keys."""

    name = "users"

    def __init__(self, keys: UserKeys) -> None:
        self._keys = keys
        self._handlers: dict[str, Callable[[EventEnvelope, Mapping[str, bytes | None]], Effect]] = {
            _REGISTERED: self._registered,
            _PROFILE_UPDATED: self._profile_updated,
            _DEACTIVATED: self._deactivated,
        }

    @property
    def checkpoint_key(self) -> str:
        """Redis key of this read model's checkpoint."""
        return self._keys.checkpoint

    def state_keys(self, envelope: EventEnvelope) -> Sequence[str]:
        """The user's view key for events that change an existing user, else nothing."""
        if envelope.event_type not in _NEEDS_VIEW:
            return ()
        try:
            return (self._keys.view(_canonical_user_id(envelope)),)
        except PoisonEvent:
            # project() raises the same error with the event in hand; nothing to read here.
            return ()

    def project(self, envelope: EventEnvelope, state: Mapping[str, bytes | None]) -> Effect:
        """The ops for one event; unknown event types change nothing but the checkpoint."""
        handler = self._handlers.get(envelope.event_type)
        if handler is None:
            return Effect()
        return handler(envelope, state)

    def _registered(self, envelope: EventEnvelope, _state: Mapping[str, bytes | None]) -> Effect:
        event = _decode(UserRegistered, envelope)
        user_id = _canonical_user_id(envelope)
        registered_at = _time_or_occurred(event.registered_at, envelope)
        view = UserView(
            user_id=user_id,
            email=event.email,
            username=event.username,
            full_name=event.full_name,
            active=True,
            version=envelope.aggregate_version,
        )
        view.created_at.CopyFrom(registered_at)
        view.updated_at.CopyFrom(registered_at)
        data = view.SerializeToString(deterministic=True)
        # The write side guarantees an id registers once (aggregate version 1), so the effect
        # does not depend on prior state and needs no read before it is applied.
        ops: list[Op] = [
            ("SET", self._keys.view(user_id), data),
            ("HSET", self._keys.by_email, email_key(event.email), user_id),
        ]
        for sort in SortField:
            member = index_member(sort, view)
            ops.append(("ZADD", self._keys.index(sort, Subset.ALL), 0, member))
            ops.append(("ZADD", self._keys.index(sort, Subset.ACTIVE), 0, member))
        ops.append(("HINCRBY", self._keys.stats, "users", 1))
        ops.append(("HINCRBY", self._keys.stats, "active_users", 1))
        return Effect(ops=ops, state={self._keys.view(user_id): data})

    def _current_view(self, envelope: EventEnvelope, state: Mapping[str, bytes | None]) -> UserView | None:
        key = self._keys.view(_canonical_user_id(envelope))
        raw = state.get(key)
        if raw is None:
            logger.warning(
                "%s for a user without a view; skipped",
                envelope.event_type,
                extra={"event_id": envelope.event_id, "position": envelope.position},
            )
            return None
        view = UserView.FromString(raw)
        if envelope.aggregate_version <= view.version:
            # Positions already order events; this only guards against a corrupt log.
            logger.warning(
                "%s does not advance the user's version; skipped",
                envelope.event_type,
                extra={"event_id": envelope.event_id, "view_version": view.version},
            )
            return None
        return view

    def _profile_updated(self, envelope: EventEnvelope, state: Mapping[str, bytes | None]) -> Effect:
        event = _decode(UserProfileUpdated, envelope)
        view = self._current_view(envelope, state)
        if view is None:
            return Effect()
        view.full_name = event.full_name
        view.bio = event.bio
        view.avatar_url = event.avatar_url
        view.version = envelope.aggregate_version
        view.updated_at.CopyFrom(_time_or_occurred(event.updated_at, envelope))
        data = view.SerializeToString(deterministic=True)
        key = self._keys.view(view.user_id)
        return Effect(ops=[("SET", key, data)], state={key: data})

    def _deactivated(self, envelope: EventEnvelope, state: Mapping[str, bytes | None]) -> Effect:
        event = _decode(UserDeactivated, envelope)
        view = self._current_view(envelope, state)
        if view is None:
            return Effect()
        was_active = view.active
        view.active = False
        view.deactivation_reason = event.reason
        view.version = envelope.aggregate_version
        view.updated_at.CopyFrom(_time_or_occurred(event.deactivated_at, envelope))
        data = view.SerializeToString(deterministic=True)
        key = self._keys.view(view.user_id)
        ops: list[Op] = [("SET", key, data)]
        if was_active:
            for sort in SortField:
                member = index_member(sort, view)
                ops.append(("ZREM", self._keys.index(sort, Subset.ACTIVE), member))
                ops.append(("ZADD", self._keys.index(sort, Subset.INACTIVE), 0, member))
            ops.append(("HINCRBY", self._keys.stats, "active_users", -1))
        return Effect(ops=ops, state={key: data})
