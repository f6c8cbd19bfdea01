"""The orders projection: order events -> OrderView, its indexes and the daily statistics.

Every handler turns the order's current view into its next view; the ops are then derived
from the difference between the two (`_diff`), so that the indexes and the statistics can
never disagree with the views:

- index membership: what `_memberships` says the old view occupies and the new one does not
  is removed, and the reverse added (the total and updated_at indexes move this way);
- statistics: `_contributions` says what one order adds to the figures of its (currency,
  placing day): 1 to `placed`, 1 to its current status, and while it is paid 1 to `paid`,
  its total to `revenue` and its quantities to `qty:<sku>`. The difference is applied with
  HINCRBY, so a status change moves one count from the old status to the new one and a
  refund takes back exactly what the capture added, in integer minor units.

The order's statuses come from its own events, except RESERVED: the saga reserves stock on
the product aggregates (one StockReserved per product, carrying the order id), so the first
StockReserved of a pending order, or its PaymentAuthorized, moves it to RESERVED.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from read_service.keys import OrderKeys, OrderSortField, keyed_member
from read_service.projections.base import Effect, Op, PoisonEvent
from read_service.projections.support import canonical_id, decode, event_name, load, time_or_occurred
from read_service.search import gram_ops, grams
from tessera.catalog.v1.events_pb2 import StockReserved
from tessera.events.v1.envelope_pb2 import EventEnvelope
from tessera.orders.v1.events_pb2 import (
    OrderCancelled,
    OrderConfirmed,
    OrderItemAdded,
    OrderPlaced,
    OrderRejected,
    OrderShipped,
    PaymentAuthorized,
    PaymentCaptured,
    PaymentDeclined,
    PaymentRefunded,
    PaymentVoided,
    StockReservationFailed,
)
from tessera.orders.v1.order_pb2 import OrderStatus
from tessera.orders.v1.order_query_service_pb2 import OrderView, StatusChange

logger = logging.getLogger(__name__)

ORDER_AGGREGATE = "order"

_PLACED = event_name(OrderPlaced)
_STOCK_RESERVED = event_name(StockReserved)

Handler = Callable[[EventEnvelope, Message, OrderView | None], OrderView | None]


def status_name(status: int) -> str:
    """The status without its enum prefix, as used in statistics fields ("PENDING")."""
    return OrderStatus.Name(status).removeprefix("ORDER_STATUS_")  # type: ignore[arg-type]


def day_of(timestamp: Timestamp) -> str:
    """The UTC day of a timestamp, YYYY-MM-DD."""
    return datetime.fromtimestamp(timestamp.seconds, tz=UTC).date().isoformat()


def _micros(timestamp: Timestamp) -> int:
    return timestamp.seconds * 1_000_000 + timestamp.nanos // 1000


class OrdersProjection:
    """Maintains the orders read model described in read_service.keys (OrderKeys)."""

    name = "orders"
    # 2: the search index (orders:tri:*); a replica of this version builds a generation that has it.
    # 3: the search index's rank set (orders:rank).
    # 4: trigram sets are sorted sets scored by placing time, walked in page order; no rank set.
    # 5: trigram set members are the id's 16 bytes rather than its text (a third less memory).
    version: int = 5

    def __init__(self, keys: OrderKeys) -> None:
        self._keys = keys
        # The key of the index of every order by each sort, built once.
        self._indexes = {sort: keys.index(sort) for sort in OrderSortField}
        self._handlers: dict[str, tuple[type[Message], Handler]] = {
            _PLACED: (OrderPlaced, self._placed),
            event_name(OrderItemAdded): (OrderItemAdded, self._item_added),
            event_name(StockReservationFailed): (StockReservationFailed, self._reservation_failed),
            event_name(OrderRejected): (OrderRejected, self._rejected),
            _STOCK_RESERVED: (StockReserved, self._stock_reserved),
            event_name(PaymentAuthorized): (PaymentAuthorized, self._authorized),
            event_name(PaymentDeclined): (PaymentDeclined, self._declined),
            event_name(PaymentCaptured): (PaymentCaptured, self._captured),
            event_name(PaymentVoided): (PaymentVoided, self._voided),
            event_name(PaymentRefunded): (PaymentRefunded, self._refunded),
            event_name(OrderConfirmed): (OrderConfirmed, self._confirmed),
            event_name(OrderCancelled): (OrderCancelled, self._cancelled),
            event_name(OrderShipped): (OrderShipped, self._shipped),
        }
        # Every other event type changes nothing here: the projector only moves the checkpoint over it.
        self.handles: frozenset[str] = frozenset(self._handlers)

    @property
    def checkpoint_key(self) -> str:
        """Redis key of this read model's checkpoint."""
        return self._keys.checkpoint

    def state_keys(self, envelope: EventEnvelope) -> Sequence[str]:
        """The view of the order an event is about (for StockReserved: the order it reserves for)."""
        entry = self._handlers.get(envelope.event_type)
        if entry is None:
            return ()
        try:
            payload = decode(entry[0], envelope)
            return (self._keys.view(self._order_id(envelope, payload)),)
        except PoisonEvent:
            # project() raises the same error with the event in hand; nothing to read here.
            return ()

    def sequence_of(self, envelope: EventEnvelope) -> str:
        """The order an event is about (for StockReserved: the order it reserves for), as `order/<id>`.

        With aggregate parking (decision 0029) the events of one sequence wait behind a parked one.
        """
        try:
            if envelope.aggregate_type == ORDER_AGGREGATE:
                return f"{ORDER_AGGREGATE}/{canonical_id(envelope.aggregate_id, 'aggregate_id')}"
            entry = self._handlers.get(envelope.event_type)
            if entry is not None:
                return f"{ORDER_AGGREGATE}/{self._order_id(envelope, decode(entry[0], envelope))}"
        except PoisonEvent:
            pass
        return f"{envelope.aggregate_type}/{envelope.aggregate_id}"

    def project(self, envelope: EventEnvelope, state: Mapping[str, bytes | None]) -> Effect:
        """The ops for one event; other event types change nothing but the checkpoint."""
        entry = self._handlers.get(envelope.event_type)
        if entry is None:
            return Effect()
        message_type, handler = entry
        payload = decode(message_type, envelope)
        order_id = self._order_id(envelope, payload)
        old = load(OrderView, state, self._keys.view(order_id))
        if old is None and envelope.event_type != _PLACED:
            logger.warning(
                "%s for an order without a view; skipped",
                envelope.event_type,
                extra={"event_id": envelope.event_id, "position": envelope.position},
            )
            return Effect()
        if old is not None and envelope.aggregate_type == ORDER_AGGREGATE and envelope.aggregate_version <= old.version:
            # Positions already order events; this only guards against a corrupt log.
            logger.warning(
                "%s does not advance the order's version; skipped",
                envelope.event_type,
                extra={"event_id": envelope.event_id, "view_version": old.version},
            )
            return Effect()
        new = handler(envelope, payload, None if old is None else _copy(old))
        if new is None or (old is not None and new == old):
            return Effect()
        if envelope.aggregate_type == ORDER_AGGREGATE:
            new.version = envelope.aggregate_version
        return self._diff(old, new)

    # -- event handlers: old view (a copy) -> new view, or None for no change --------------------

    @staticmethod
    def _order_id(envelope: EventEnvelope, payload: Message) -> str:
        order_id = canonical_id(getattr(payload, "order_id", ""), "order_id")
        if envelope.aggregate_type == ORDER_AGGREGATE and order_id != canonical_id(
            envelope.aggregate_id, "aggregate_id"
        ):
            raise PoisonEvent(f"payload order_id {order_id!r} differs from aggregate_id {envelope.aggregate_id!r}")
        return order_id

    def _placed(self, envelope: EventEnvelope, payload: Message, old: OrderView | None) -> OrderView | None:
        assert isinstance(payload, OrderPlaced)
        if old is not None:
            logger.warning("OrderPlaced for an order that has a view; skipped", extra={"event_id": envelope.event_id})
            return None
        placed_at = time_or_occurred(payload.placed_at, envelope)
        view = OrderView(
            order_id=canonical_id(payload.order_id, "order_id"),
            customer_id=canonical_id(payload.customer_id, "customer_id"),
            customer_name=payload.customer_name,
            customer_email=payload.customer_email,
            lines=payload.lines,
            total=payload.total,
            shipping_address=payload.shipping_address,
            notes=payload.notes,
        )
        view.placed_at.CopyFrom(placed_at)
        _enter(view, OrderStatus.ORDER_STATUS_PENDING, placed_at)
        return view

    def _item_added(self, envelope: EventEnvelope, payload: Message, view: OrderView | None) -> OrderView | None:
        assert isinstance(payload, OrderItemAdded) and view is not None
        line = payload.line
        for existing in view.lines:
            if existing.product_id == line.product_id or existing.sku.lower() == line.sku.lower():
                existing.CopyFrom(line)
                break
        else:
            view.lines.append(line)
        view.total.CopyFrom(payload.total)
        view.updated_at.CopyFrom(time_or_occurred(payload.added_at, envelope))
        return view

    def _reservation_failed(
        self, envelope: EventEnvelope, payload: Message, view: OrderView | None
    ) -> OrderView | None:
        assert isinstance(payload, StockReservationFailed) and view is not None
        view.reason = payload.reason
        view.updated_at.CopyFrom(time_or_occurred(payload.failed_at, envelope))
        return view

    def _rejected(self, envelope: EventEnvelope, payload: Message, view: OrderView | None) -> OrderView | None:
        assert isinstance(payload, OrderRejected) and view is not None
        view.reason = payload.reason
        _enter(view, OrderStatus.ORDER_STATUS_REJECTED, time_or_occurred(payload.rejected_at, envelope), payload.reason)
        return view

    def _stock_reserved(self, envelope: EventEnvelope, payload: Message, view: OrderView | None) -> OrderView | None:
        assert isinstance(payload, StockReserved) and view is not None
        if view.status != OrderStatus.ORDER_STATUS_PENDING:
            return None  # a later product of the same reservation, or a late event: nothing to change
        _enter(view, OrderStatus.ORDER_STATUS_RESERVED, time_or_occurred(payload.reserved_at, envelope))
        return view

    def _authorized(self, envelope: EventEnvelope, payload: Message, view: OrderView | None) -> OrderView | None:
        assert isinstance(payload, PaymentAuthorized) and view is not None
        at = time_or_occurred(payload.authorized_at, envelope)
        if view.status == OrderStatus.ORDER_STATUS_PENDING:
            _enter(view, OrderStatus.ORDER_STATUS_RESERVED, at)
        view.updated_at.CopyFrom(at)
        return view

    def _declined(self, envelope: EventEnvelope, payload: Message, view: OrderView | None) -> OrderView | None:
        assert isinstance(payload, PaymentDeclined) and view is not None
        view.reason = payload.reason
        view.updated_at.CopyFrom(time_or_occurred(payload.declined_at, envelope))
        return view

    def _captured(self, envelope: EventEnvelope, payload: Message, view: OrderView | None) -> OrderView | None:
        assert isinstance(payload, PaymentCaptured) and view is not None
        view.paid = True
        view.updated_at.CopyFrom(time_or_occurred(payload.captured_at, envelope))
        return view

    def _voided(self, envelope: EventEnvelope, payload: Message, view: OrderView | None) -> OrderView | None:
        assert isinstance(payload, PaymentVoided) and view is not None
        view.updated_at.CopyFrom(time_or_occurred(payload.voided_at, envelope))
        return view

    def _refunded(self, envelope: EventEnvelope, payload: Message, view: OrderView | None) -> OrderView | None:
        assert isinstance(payload, PaymentRefunded) and view is not None
        view.paid = False
        view.updated_at.CopyFrom(time_or_occurred(payload.refunded_at, envelope))
        return view

    def _confirmed(self, envelope: EventEnvelope, payload: Message, view: OrderView | None) -> OrderView | None:
        assert isinstance(payload, OrderConfirmed) and view is not None
        # Confirmation follows the capture; a stream without a separate capture still counts it paid.
        view.paid = True
        _enter(view, OrderStatus.ORDER_STATUS_CONFIRMED, time_or_occurred(payload.confirmed_at, envelope))
        return view

    def _cancelled(self, envelope: EventEnvelope, payload: Message, view: OrderView | None) -> OrderView | None:
        assert isinstance(payload, OrderCancelled) and view is not None
        view.reason = payload.reason
        view.cancelled_by = payload.cancelled_by
        at = time_or_occurred(payload.cancelled_at, envelope)
        _enter(view, OrderStatus.ORDER_STATUS_CANCELLED, at, payload.reason)
        return view

    def _shipped(self, envelope: EventEnvelope, payload: Message, view: OrderView | None) -> OrderView | None:
        assert isinstance(payload, OrderShipped) and view is not None
        view.carrier = payload.carrier
        view.tracking_number = payload.tracking_number
        _enter(view, OrderStatus.ORDER_STATUS_SHIPPED, time_or_occurred(payload.shipped_at, envelope))
        return view

    # -- from (old view, new view) to ops ---------------------------------------------------------

    def _memberships(self, view: OrderView) -> set[tuple[str, bytes]]:
        # As sort_member for each sort, with the placing-time member (two indexes use it) built once.
        indexes = self._indexes
        order_id = view.order_id
        placed = keyed_member(_micros(view.placed_at), order_id)
        return {
            (indexes[OrderSortField.PLACED_AT], placed),
            (indexes[OrderSortField.TOTAL], keyed_member(view.total.amount_minor, order_id)),
            (indexes[OrderSortField.UPDATED_AT], keyed_member(_micros(view.updated_at), order_id)),
            (self._keys.by_customer(view.customer_id), placed),
        }

    def _contributions(self, view: OrderView) -> dict[tuple[str, str], int]:
        key = self._keys.stats(view.total.currency_code, day_of(view.placed_at))
        figures = {(key, "placed"): 1, (key, f"status:{status_name(view.status)}"): 1}
        if view.paid:
            figures[(key, "paid")] = 1
            figures[(key, "revenue")] = view.total.amount_minor
            for line in view.lines:
                name = (key, f"qty:{line.sku}")
                figures[name] = figures.get(name, 0) + line.quantity
        return figures

    def _diff(self, old: OrderView | None, new: OrderView) -> Effect:
        data = new.SerializeToString(deterministic=True)
        view_key = self._keys.view(new.order_id)
        ops: list[Op] = [("SET", view_key, data)]
        before = set() if old is None else self._memberships(old)
        after = self._memberships(new)
        ops.extend(("ZREM", index, member) for index, member in sorted(before - after))
        ops.extend(("ZADD", index, 0, member) for index, member in sorted(after - before))
        # The trigram sets are scored by the placing time: written again if it ever moves.
        placed = max(_micros(new.placed_at), 0)
        moved = old is not None and max(_micros(old.placed_at), 0) != placed
        if old is None or moved or not _same_search_text(old, new):
            before_grams = set() if old is None else searchable(old)
            ops.extend(
                gram_ops(self._keys.trigram, new.order_id, before_grams, searchable(new), placed, rank_changed=moved)
            )
        change = self._contributions(new)
        if old is not None:
            for name, amount in self._contributions(old).items():
                change[name] = change.get(name, 0) - amount
        ops.extend(("HINCRBY", key, name, amount) for (key, name), amount in sorted(change.items()) if amount)
        if new.paid and (old is None or not old.paid):
            key = self._keys.stats(new.total.currency_code, day_of(new.placed_at))
            ops.extend(("HSET", key, f"name:{line.sku}", line.product_name) for line in new.lines)
        return Effect(ops=ops, state={view_key: data})


def sort_member(sort: OrderSortField, view: OrderView) -> bytes:
    """The member that places `view` in the index for `sort` (and, for placed_at, its customer's)."""
    if sort is OrderSortField.PLACED_AT:
        key = _micros(view.placed_at)
    elif sort is OrderSortField.TOTAL:
        key = view.total.amount_minor
    else:
        key = _micros(view.updated_at)
    return keyed_member(key, view.order_id)


def searchable(view: OrderView) -> set[str]:
    """The trigrams SearchOrders' `text` looks for in an order (read_service.search)."""
    texts = [view.customer_name, view.customer_email]
    for line in view.lines:
        texts.append(line.sku)
        texts.append(line.product_name)
    return grams(texts)


def _same_search_text(old: OrderView, new: OrderView) -> bool:
    """True when `searchable` gives the same trigrams for both (most events only move the status)."""
    return (
        old.customer_name == new.customer_name and old.customer_email == new.customer_email and old.lines == new.lines
    )


def _copy(view: OrderView) -> OrderView:
    copy = OrderView()
    copy.CopyFrom(view)
    return copy


def _enter(view: OrderView, status: OrderStatus.ValueType, at: Timestamp, reason: str = "") -> None:
    view.status = status
    view.status_history.append(StatusChange(status=status, at=at, reason=reason))
    view.updated_at.CopyFrom(at)
