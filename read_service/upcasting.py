"""Upcasting: an event written by older code is read as the current code's version of it.

An event's payload evolves by protobuf's rules (fields are added, old ones deprecated, numbers
never reused), so the current message class parses every older payload. What changes in meaning
between versions (a renamed or split field) is undone here, by one small function per step:
version 1 → 2, 2 → 3, and so on for each event type. `upcast` runs the steps from the
envelope's `schema_version` to the current one, in order.

The current version of an event type is one more than its number of steps (1 for a type with
no steps). A version above that was written by newer code than this replica's: it is refused
(the caller parks it, as before), never guessed at. Version 0 was never written and is refused too.

`read_service.projections.support.decode` is the only caller: every projection decodes its
payloads there, on every path (live apply, catch-up, rebuild and watch replay), so the chain
runs wherever an event is projected. Decision 0030.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from google.protobuf.message import Message

from tessera.users.v1.events_pb2 import UserRegistered

M = TypeVar("M", bound=Message)

# One step: the payload as the version before wrote it → the payload as the next version writes it.
Step = Callable[[Message], Message]


class UnsupportedSchemaVersion(ValueError):
    """An event's schema version that this code cannot read (newer than it knows, or below 1)."""


def _user_registered_v1_to_v2(payload: Message) -> Message:
    """Version 2 carries the name in display_name (6); version 1 had it in full_name (4)."""
    assert isinstance(payload, UserRegistered)
    if not payload.display_name:
        payload.display_name = payload.full_name
    payload.ClearField("full_name")
    return payload


# Every event type's steps, oldest first: STEPS[t][i] turns version i + 1 into version i + 2.
STEPS: Mapping[str, Sequence[Step]] = {
    UserRegistered.DESCRIPTOR.full_name: (_user_registered_v1_to_v2,),
}

# The version the current code reads and writes, per event type that has ever changed.
CURRENT: Mapping[str, int] = {event_type: len(steps) + 1 for event_type, steps in STEPS.items()}


def current_version(event_type: str) -> int:
    """The schema version this code reads for `event_type` (1 for a type that never changed)."""
    return CURRENT.get(event_type, 1)


def check_version(event_type: str, schema_version: int) -> None:
    """Raise UnsupportedSchemaVersion unless `schema_version` is between 1 and the current version."""
    if not 1 <= schema_version <= CURRENT.get(event_type, 1):
        raise UnsupportedSchemaVersion(
            f"{event_type} schema version {schema_version} is not supported "
            f"(this code reads 1 to {current_version(event_type)})"
        )


def upcast(event_type: str, schema_version: int, payload: M) -> M:
    """`payload` (of `event_type`, written at `schema_version`) as the current version; see the module docstring."""
    current = CURRENT.get(event_type, 1)
    if schema_version == current:
        return payload
    check_version(event_type, schema_version)
    result: Message = payload
    for step in STEPS[event_type][schema_version - 1 : current - 1]:
        result = step(result)
    if not isinstance(result, type(payload)):
        raise TypeError(f"upcasting {event_type} gave a {type(result).__name__}, not a {type(payload).__name__}")
    return result
