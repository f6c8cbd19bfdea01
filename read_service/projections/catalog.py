"""The catalog projection: product events -> ProductView and the sku-ordered indexes.

Every event of a product aggregate (its own commands, and the stock reservations and
releases an order's saga makes) carries the product's state after the change where it
matters (`stock_available`), so the view follows the stream without arithmetic.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from read_service.keys import CatalogKeys, product_member
from read_service.projections.base import Effect, Op, PoisonEvent
from read_service.projections.support import canonical_id, decode, event_name, load, time_or_occurred
from tessera.catalog.v1.events_pb2 import (
    ProductAdded,
    ProductDiscontinued,
    ProductPriceUpdated,
    ProductRestocked,
    StockReleased,
    StockReserved,
)
from tessera.catalog.v1.product_query_service_pb2 import ProductView
from tessera.events.v1.envelope_pb2 import EventEnvelope

logger = logging.getLogger(__name__)

_ADDED = event_name(ProductAdded)

Handler = Callable[[EventEnvelope, Mapping[str, bytes | None]], Effect]


def _product_id(envelope: EventEnvelope, payload: Message) -> str:
    product_id = canonical_id(getattr(payload, "product_id", ""), "product_id")
    if product_id != canonical_id(envelope.aggregate_id, "aggregate_id"):
        raise PoisonEvent(f"payload product_id {product_id!r} differs from aggregate_id {envelope.aggregate_id!r}")
    return product_id


class CatalogProjection:
    """Maintains the catalog read model described in read_service.keys (CatalogKeys)."""

    name = "catalog"
    version: int = 1

    def __init__(self, keys: CatalogKeys) -> None:
        self._keys = keys
        self._handlers: dict[str, Handler] = {
            _ADDED: self._added,
            event_name(ProductPriceUpdated): self._price_updated,
            event_name(ProductRestocked): self._restocked,
            event_name(ProductDiscontinued): self._discontinued,
            event_name(StockReserved): self._stock_reserved,
            event_name(StockReleased): self._stock_released,
        }
        # Every other event type changes nothing here: the projector only moves the checkpoint over it.
        self.handles: frozenset[str] = frozenset(self._handlers)

    @property
    def checkpoint_key(self) -> str:
        """Redis key of this read model's checkpoint."""
        return self._keys.checkpoint

    def state_keys(self, envelope: EventEnvelope) -> Sequence[str]:
        """The product's view key for every product event but its creation, else nothing.

        ProductAdded reads nothing first, like UserRegistered: the log holds one version 1 per
        aggregate (a unique constraint), so the view cannot exist yet, and reading it would
        cost the applying replica a Redis round trip for every new product.
        """
        if envelope.event_type not in self._handlers or envelope.event_type == _ADDED:
            return ()
        try:
            return (self._keys.view(canonical_id(envelope.aggregate_id, "aggregate_id")),)
        except PoisonEvent:
            # project() raises the same error with the event in hand; nothing to read here.
            return ()

    def project(self, envelope: EventEnvelope, state: Mapping[str, bytes | None]) -> Effect:
        """The ops for one event; other event types change nothing but the checkpoint."""
        handler = self._handlers.get(envelope.event_type)
        if handler is None:
            return Effect()
        return handler(envelope, state)

    def _write(self, view: ProductView, extra: Sequence[Op] = ()) -> Effect:
        data = view.SerializeToString(deterministic=True)
        key = self._keys.view(view.product_id)
        return Effect(ops=[("SET", key, data), *extra], state={key: data})

    def _current(
        self, envelope: EventEnvelope, product_id: str, state: Mapping[str, bytes | None]
    ) -> ProductView | None:
        view = load(ProductView, state, self._keys.view(product_id))
        if view is None:
            logger.warning(
                "%s for a product without a view; skipped",
                envelope.event_type,
                extra={"event_id": envelope.event_id, "position": envelope.position},
            )
            return None
        if envelope.aggregate_version <= view.version:
            # Positions already order events; this only guards against a corrupt log.
            logger.warning(
                "%s does not advance the product's version; skipped",
                envelope.event_type,
                extra={"event_id": envelope.event_id, "view_version": view.version},
            )
            return None
        return view

    def _added(self, envelope: EventEnvelope, _state: Mapping[str, bytes | None]) -> Effect:
        event = decode(ProductAdded, envelope)
        product_id = _product_id(envelope, event)
        added_at = time_or_occurred(event.added_at, envelope)
        view = ProductView(
            product_id=product_id,
            sku=event.sku,
            name=event.name,
            price=event.price,
            stock_available=event.stock_available,
            discontinued=False,
            version=envelope.aggregate_version,
        )
        view.created_at.CopyFrom(added_at)
        view.updated_at.CopyFrom(added_at)
        member = product_member(event.sku, product_id)
        return self._write(
            view,
            [("ZADD", self._keys.index(True), 0, member), ("ZADD", self._keys.index(False), 0, member)],
        )

    def _price_updated(self, envelope: EventEnvelope, state: Mapping[str, bytes | None]) -> Effect:
        event = decode(ProductPriceUpdated, envelope)
        view = self._current(envelope, _product_id(envelope, event), state)
        if view is None:
            return Effect()
        view.price.CopyFrom(event.price)
        return self._changed(view, envelope, event.updated_at)

    def _restocked(self, envelope: EventEnvelope, state: Mapping[str, bytes | None]) -> Effect:
        event = decode(ProductRestocked, envelope)
        view = self._current(envelope, _product_id(envelope, event), state)
        if view is None:
            return Effect()
        view.stock_available = event.stock_available
        return self._changed(view, envelope, event.restocked_at)

    def _stock_reserved(self, envelope: EventEnvelope, state: Mapping[str, bytes | None]) -> Effect:
        event = decode(StockReserved, envelope)
        view = self._current(envelope, _product_id(envelope, event), state)
        if view is None:
            return Effect()
        view.stock_available = event.stock_available
        return self._changed(view, envelope, event.reserved_at)

    def _stock_released(self, envelope: EventEnvelope, state: Mapping[str, bytes | None]) -> Effect:
        event = decode(StockReleased, envelope)
        view = self._current(envelope, _product_id(envelope, event), state)
        if view is None:
            return Effect()
        view.stock_available = event.stock_available
        return self._changed(view, envelope, event.released_at)

    def _discontinued(self, envelope: EventEnvelope, state: Mapping[str, bytes | None]) -> Effect:
        event = decode(ProductDiscontinued, envelope)
        view = self._current(envelope, _product_id(envelope, event), state)
        if view is None:
            return Effect()
        was_active = not view.discontinued
        view.discontinued = True
        extra: list[Op] = []
        if was_active:
            extra.append(("ZREM", self._keys.index(False), product_member(view.sku, view.product_id)))
        return self._changed(view, envelope, event.discontinued_at, extra)

    def _changed(self, view: ProductView, envelope: EventEnvelope, at: Timestamp, extra: Sequence[Op] = ()) -> Effect:
        view.version = envelope.aggregate_version
        view.updated_at.CopyFrom(time_or_occurred(at, envelope))
        return self._write(view, extra)
