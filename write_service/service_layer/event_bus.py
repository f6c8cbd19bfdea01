"""The message bus's event half: domain events go to in-process policies, in the unit of work that recorded them.

A policy reacts to an event of one context by changing aggregates (of any context) through
the same unit of work: what it changes commits with the command, or not at all. The events
the policy's aggregates record are handled in turn. Afterwards only the integration events
among them all (`write_service.domain.events`) are written to the outbox.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime

from google.protobuf.message import Message

from shared_kernel.contracts.event_log import NewEvent
from write_service.domain.aggregate import Aggregate
from write_service.domain.events import is_public
from write_service.service_layer.ports import UnitOfWork

# A policy: (the event, the unit of work, the time) -> the aggregates it changed and saved.
Policy = Callable[[NewEvent, UnitOfWork, datetime], Awaitable[Sequence[Aggregate]]]
Policies = Mapping[type[Message], Sequence[Policy]]

# More events than this from one unit of work means policies that trigger each other forever.
MAX_EVENTS = 10_000


async def handle_domain_events(
    uow: UnitOfWork, events: Sequence[NewEvent], now: datetime, policies: Policies | None = None
) -> list[NewEvent]:
    """Run the policies of `events` and of the events they record; every event, in the order recorded."""
    table = _registered() if policies is None else policies
    recorded = list(events)
    index = 0
    while index < len(recorded):
        event = recorded[index]
        index += 1
        for policy in table.get(type(event.payload), ()):
            for aggregate in await policy(event, uow, now):
                recorded.extend(aggregate.pending_events)
                aggregate.pending_events.clear()
        if len(recorded) > MAX_EVENTS:
            raise RuntimeError("policies recorded more than MAX_EVENTS events in one unit of work")
    return recorded


def integration_events(events: Sequence[NewEvent]) -> list[NewEvent]:
    """The events that leave the service through the outbox."""
    return [event for event in events if is_public(event.payload)]


def _registered() -> Policies:
    # The table imports every context's policies, which import this module's types.
    from write_service.service_layer.handler_table import POLICIES

    return POLICIES
