"""Helpers the catalog and orders projections share: decoding payloads and reading state."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import TypeVar

from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp

from read_service.projections.base import PoisonEvent
from tessera.events.v1.envelope_pb2 import EventEnvelope

# The payload schema version these projections understand.
SCHEMA_VERSION = 1

M = TypeVar("M", bound=Message)


def canonical_id(value: str, what: str) -> str:
    """`value` as a canonical (lower-case) UUID; PoisonEvent when it is not one."""
    try:
        return str(uuid.UUID(value))
    except ValueError as exc:
        raise PoisonEvent(f"{what} {value!r} is not a UUID") from exc


def decode(message_type: type[M], envelope: EventEnvelope) -> M:
    """The envelope's payload; PoisonEvent for an unknown schema version or bytes that do not decode."""
    if envelope.schema_version != SCHEMA_VERSION:
        raise PoisonEvent(f"{envelope.event_type} schema version {envelope.schema_version} is not supported")
    try:
        return message_type.FromString(envelope.payload)
    except DecodeError as exc:
        raise PoisonEvent(f"payload of {envelope.event_type} does not decode") from exc


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
