"""Helpers the catalog and orders projections share: decoding payloads and reading state."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import TypeVar

from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp

from read_service.projections.base import PoisonEvent
from read_service.upcasting import UnsupportedSchemaVersion, check_version, upcast
from tessera.events.v1.envelope_pb2 import EventEnvelope

M = TypeVar("M", bound=Message)


# The canonical form, as str(uuid.UUID(...)) writes it: what the write side puts in every id.
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def canonical_id(value: str, what: str) -> str:
    """`value` as a canonical (lower-case) UUID; PoisonEvent when it is not one."""
    # Every event names its ids several times; building a UUID for each was a tenth of live apply.
    if _CANONICAL_UUID.fullmatch(value):
        return value
    try:
        return str(uuid.UUID(value))
    except ValueError as exc:
        raise PoisonEvent(f"{what} {value!r} is not a UUID") from exc


def decode(message_type: type[M], envelope: EventEnvelope) -> M:
    """The envelope's payload as the current schema version (upcast when older); PoisonEvent when it cannot be.

    Every projection decodes its payloads here, on every path, so the upcasting chain
    (read_service.upcasting) runs wherever an event is projected.
    """
    event_type = envelope.event_type
    schema_version = envelope.schema_version
    try:
        check_version(event_type, schema_version)
        return upcast(event_type, schema_version, message_type.FromString(envelope.payload))
    except UnsupportedSchemaVersion as exc:
        raise PoisonEvent(str(exc)) from exc
    except DecodeError as exc:
        raise PoisonEvent(f"payload of {event_type} does not decode") from exc


def time_or_occurred(value: Timestamp, envelope: EventEnvelope) -> Timestamp:
    """The payload's timestamp, or the envelope's when the payload left it unset (a view never says 1970)."""
    return value if value.seconds or value.nanos else envelope.occurred_at


def load(message_type: type[M], state: Mapping[str, bytes | None], key: str) -> M | None:
    """The message stored at `key` in the projection's state, or None."""
    raw = state.get(key)
    return None if raw is None else message_type.FromString(raw)


def event_name(message_type: type[Message]) -> str:
    """The event type name an envelope carries for payloads of `message_type`."""
    return message_type.DESCRIPTOR.full_name
