"""Which of the aggregates' events are public: integration events, the contract with other services.

Every event an aggregate records is a domain event: the message bus hands it to the
in-process policies (`write_service.service_layer.event_bus`) inside the unit of work that
recorded it. Only the events named here are also integration events: they go to the outbox,
and so to the relay and the read side, and they evolve by protobuf's rules. Any other event
stays inside the write service and may change freely.

An event that is not public does not move its aggregate's version either: versions count
the aggregate's public events, the ones a consistency token and the read side see.
"""

from __future__ import annotations

from google.protobuf.message import Message

from tessera.catalog.v1 import events_pb2 as catalog_events
from tessera.orders.v1 import events_pb2 as order_events
from tessera.users.v1 import events_pb2 as user_events

PUBLIC_EVENTS: frozenset[type[Message]] = frozenset(
    {
        # users
        user_events.UserRegistered,
        user_events.UserProfileUpdated,
        user_events.UserDeactivated,
        # catalog
        catalog_events.ProductAdded,
        catalog_events.ProductPriceUpdated,
        catalog_events.ProductRestocked,
        catalog_events.ProductDiscontinued,
        catalog_events.StockReserved,
        catalog_events.StockReleased,
        # orders
        order_events.OrderPlaced,
        order_events.OrderItemAdded,
        order_events.StockReservationFailed,
        order_events.OrderRejected,
        order_events.PaymentAuthorized,
        order_events.PaymentDeclined,
        order_events.PaymentCaptured,
        order_events.PaymentVoided,
        order_events.PaymentRefunded,
        order_events.OrderConfirmed,
        order_events.OrderCancelled,
        order_events.OrderShipped,
    }
)


def is_public(payload: Message) -> bool:
    """Whether the event is an integration event (goes to the outbox), not only a domain event."""
    return type(payload) in PUBLIC_EVENTS
