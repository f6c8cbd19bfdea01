"""The users projection: user events -> UserView, e-mail index, sorted list indexes and counters.

It also follows the orders of each user for the view's order figures: OrderPlaced counts
the order and moves `last_order_at`; the payment events keep what the user has paid and
not been refunded, per currency, in a hash that queries merge into the view (`total_spent`).
The later events of an order name only the order, so the projection keeps its own small
note of each order (customer, currency, total, paid) in its key space.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from google.protobuf.message import Message

from read_service.keys import SortField, Subset, UserKeys, email_key, index_member
from read_service.projections.base import Effect, Op, PoisonEvent
from read_service.projections.support import canonical_id, decode, time_or_occurred
from read_service.search import gram_ops, grams
from tessera.events.v1.envelope_pb2 import EventEnvelope
from tessera.orders.v1.events_pb2 import (
    OrderConfirmed,
    OrderItemAdded,
    OrderPlaced,
    PaymentCaptured,
    PaymentRefunded,
)
from tessera.users.v1.events_pb2 import UserDeactivated, UserProfileUpdated, UserRegistered
from tessera.users.v1.user_query_service_pb2 import UserView

logger = logging.getLogger(__name__)

_REGISTERED = UserRegistered.DESCRIPTOR.full_name
_PROFILE_UPDATED = UserProfileUpdated.DESCRIPTOR.full_name
_DEACTIVATED = UserDeactivated.DESCRIPTOR.full_name

M = TypeVar("M", bound=Message)

# Event types whose effect depends on the user's current view.
_NEEDS_VIEW = frozenset({_PROFILE_UPDATED, _DEACTIVATED})

_ORDER_PLACED = OrderPlaced.DESCRIPTOR.full_name
_ORDER_ITEM_ADDED = OrderItemAdded.DESCRIPTOR.full_name
_PAYMENT_CAPTURED = PaymentCaptured.DESCRIPTOR.full_name
_ORDER_CONFIRMED = OrderConfirmed.DESCRIPTOR.full_name
_PAYMENT_REFUNDED = PaymentRefunded.DESCRIPTOR.full_name
# Order events after OrderPlaced that change what the customer has spent, with their payload types.
_ORDER_FOLLOW_UPS: dict[str, type[Message]] = {
    _ORDER_ITEM_ADDED: OrderItemAdded,
    _PAYMENT_CAPTURED: PaymentCaptured,
    _ORDER_CONFIRMED: OrderConfirmed,
    _PAYMENT_REFUNDED: PaymentRefunded,
}


@dataclass(frozen=True, slots=True)
class OrderNote:
    """What the users projection remembers of an order: whose it is, its total and whether it is paid."""

    customer_id: str
    currency_code: str
    total_minor: int
    paid: bool = False

    def encode(self) -> bytes:
        """The stored form (compact JSON, keys sorted).

        Written out by hand with the JSON encoder's own string quoting: the same bytes as
        json.dumps(..., separators=(",", ":"), sort_keys=True), at a fraction of its cost on a
        path that runs for every order event.
        """
        return (
            f'{{"currency":{_json_string(self.currency_code)},"customer_id":{_json_string(self.customer_id)},'
            f'"paid":{"true" if self.paid else "false"},"total":{int(self.total_minor)}}}'
        ).encode()

    @classmethod
    def decode(cls, raw: bytes) -> OrderNote:
        """The note from its stored form."""
        data = json.loads(raw)
        return cls(str(data["customer_id"]), str(data["currency"]), int(data["total"]), bool(data["paid"]))


# How json.dumps quotes a string (ASCII only, as its default ensure_ascii does).
_json_string: Callable[[str], str] = json.encoder.encode_basestring_ascii


def _searchable(view: UserView) -> set[str]:
    """The trigrams ListUsers' `search` looks for in a user (read_service.search)."""
    return grams((view.email, view.username, view.full_name))


def _rank(view: UserView) -> int:
    """The score of a user in its trigram sets: its creation time in microseconds (never changes)."""
    return max(view.created_at.ToMicroseconds(), 0)


def _canonical_user_id(envelope: EventEnvelope) -> str:
    return canonical_id(envelope.aggregate_id, "aggregate_id")


def _order_id(envelope: EventEnvelope, payload: Message) -> str:
    order_id = canonical_id(getattr(payload, "order_id", ""), "order_id")
    if order_id != envelope.aggregate_id.lower():
        raise PoisonEvent(f"payload order_id {order_id!r} differs from aggregate_id {envelope.aggregate_id!r}")
    return order_id


def _decode(message_type: type[M], envelope: EventEnvelope) -> M:
    """A user event's payload, which must name the envelope's user."""
    payload = decode(message_type, envelope)
    user_id = getattr(payload, "user_id", "")
    if user_id.lower() != envelope.aggregate_id.lower():
        raise PoisonEvent(f"payload user_id {user_id!r} differs from aggregate_id {envelope.aggregate_id!r}")
    return payload


class UsersProjection:
    """Maintains the users read model described in read_service.keys."""

    name = "users"
    # 2: the search index (users:tri:*); a replica of this version builds a generation that has it.
    # 3: the search index's rank set (users:rank).
    # 4: trigram sets are sorted sets scored by creation time, walked in page order; no rank set.
    # 5: trigram set members are the id's 16 bytes rather than its text (a third less memory).
    version: int = 5

    def __init__(self, keys: UserKeys) -> None:
        self._keys = keys
        self._handlers: dict[str, Callable[[EventEnvelope, Mapping[str, bytes | None]], Effect]] = {
            _REGISTERED: self._registered,
            _PROFILE_UPDATED: self._profile_updated,
            _DEACTIVATED: self._deactivated,
            _ORDER_PLACED: self._order_placed,
            **dict.fromkeys(_ORDER_FOLLOW_UPS, self._order_follow_up),
        }
        # Every other event type changes nothing here: the projector only moves the checkpoint over it.
        self.handles: frozenset[str] = frozenset(self._handlers)
        # Each sort with its index keys, named once rather than for every event.
        self._indexes = [
            (sort, keys.index(sort, Subset.ALL), keys.index(sort, Subset.ACTIVE), keys.index(sort, Subset.INACTIVE))
            for sort in SortField
        ]

    @property
    def checkpoint_key(self) -> str:
        """Redis key of this read model's checkpoint."""
        return self._keys.checkpoint

    def state_keys(self, envelope: EventEnvelope) -> Sequence[str]:
        """The user's view key for events that change an existing user, the order's note for order events."""
        try:
            if envelope.event_type in _NEEDS_VIEW:
                return (self._keys.view(_canonical_user_id(envelope)),)
            if envelope.event_type == _ORDER_PLACED:
                placed = decode(OrderPlaced, envelope)
                customer_id = canonical_id(placed.customer_id, "customer_id")
                return (self._keys.order(_order_id(envelope, placed)), self._keys.view(customer_id))
            follow_up = _ORDER_FOLLOW_UPS.get(envelope.event_type)
            if follow_up is not None:
                return (self._keys.order(_order_id(envelope, decode(follow_up, envelope))),)
        except (PoisonEvent, ValueError):
            # project() raises the same error with the event in hand; nothing to read here.
            return ()
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
        registered_at = time_or_occurred(event.registered_at, envelope)
        view = UserView(
            user_id=user_id,
            email=event.email,
            username=event.username,
            full_name=event.display_name,
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
        for sort, every, active, _ in self._indexes:
            member = index_member(sort, view)
            ops.append(("ZADD", every, 0, member))
            ops.append(("ZADD", active, 0, member))
        ops.append(("HINCRBY", self._keys.stats, "users", 1))
        ops.append(("HINCRBY", self._keys.stats, "active_users", 1))
        ops.extend(gram_ops(self._keys.trigram, user_id, set(), _searchable(view), _rank(view)))
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
        before = _searchable(view)
        view.full_name = event.full_name
        view.bio = event.bio
        view.avatar_url = event.avatar_url
        view.version = envelope.aggregate_version
        view.updated_at.CopyFrom(time_or_occurred(event.updated_at, envelope))
        data = view.SerializeToString(deterministic=True)
        key = self._keys.view(view.user_id)
        ops: list[Op] = [("SET", key, data)]
        ops.extend(gram_ops(self._keys.trigram, view.user_id, before, _searchable(view), _rank(view)))
        return Effect(ops=ops, state={key: data})

    def _deactivated(self, envelope: EventEnvelope, state: Mapping[str, bytes | None]) -> Effect:
        event = _decode(UserDeactivated, envelope)
        view = self._current_view(envelope, state)
        if view is None:
            return Effect()
        was_active = view.active
        view.active = False
        view.deactivation_reason = event.reason
        view.version = envelope.aggregate_version
        view.updated_at.CopyFrom(time_or_occurred(event.deactivated_at, envelope))
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

    # -- order figures ---------------------------------------------------------------------------

    def _order_placed(self, envelope: EventEnvelope, state: Mapping[str, bytes | None]) -> Effect:
        event = decode(OrderPlaced, envelope)
        order_id = _order_id(envelope, event)
        customer_id = canonical_id(event.customer_id, "customer_id")
        note_key = self._keys.order(order_id)
        if state.get(note_key) is not None:
            logger.warning("OrderPlaced for an order already noted; skipped", extra={"event_id": envelope.event_id})
            return Effect()
        note = OrderNote(customer_id, event.total.currency_code, event.total.amount_minor).encode()
        ops: list[Op] = [("SET", note_key, note)]
        changed: dict[str, bytes | None] = {note_key: note}
        view_key = self._keys.view(customer_id)
        raw = state.get(view_key)
        if raw is None:
            logger.warning(
                "OrderPlaced for a customer without a view; order not counted",
                extra={"event_id": envelope.event_id, "customer_id": customer_id},
            )
        else:
            view = UserView.FromString(raw)
            view.order_count += 1
            placed_at = time_or_occurred(event.placed_at, envelope)
            if view.last_order_at.ToMicroseconds() < placed_at.ToMicroseconds() or not view.HasField("last_order_at"):
                view.last_order_at.CopyFrom(placed_at)
            data = view.SerializeToString(deterministic=True)
            ops.append(("SET", view_key, data))
            changed[view_key] = data
        return Effect(ops=ops, state=changed)

    def _order_follow_up(self, envelope: EventEnvelope, state: Mapping[str, bytes | None]) -> Effect:
        payload = decode(_ORDER_FOLLOW_UPS[envelope.event_type], envelope)
        note_key = self._keys.order(_order_id(envelope, payload))
        raw = state.get(note_key)
        if raw is None:
            logger.warning(
                "%s for an order without a note; skipped",
                envelope.event_type,
                extra={"event_id": envelope.event_id, "position": envelope.position},
            )
            return Effect()
        before = OrderNote.decode(raw)
        after = before
        if isinstance(payload, OrderItemAdded):
            after = replace(before, total_minor=payload.total.amount_minor)
        elif isinstance(payload, PaymentCaptured | OrderConfirmed):
            after = replace(before, paid=True)
        elif isinstance(payload, PaymentRefunded):
            after = replace(before, paid=False)
        if after == before:
            return Effect()
        spent_before = before.total_minor if before.paid else 0
        spent_after = after.total_minor if after.paid else 0
        data = after.encode()
        ops: list[Op] = [("SET", note_key, data)]
        if spent_after != spent_before:
            ops.append(
                ("HINCRBY", self._keys.spent(after.customer_id), after.currency_code, spent_after - spent_before)
            )
        return Effect(ops=ops, state={note_key: data})
