"""What a projection is, as the projector sees it.

A projection turns the event at position N, together with the prior state of the view
entries that event touches, into a list of Redis write operations. The projector sends
the ops to a script that runs them only if the view's checkpoint is exactly N - 1 (or, for
events this projection does not handle right before N, at most that many positions lower). The
state a projection reads is therefore always the state after event N - 1, because the
projector reads that state and the checkpoint in one atomic step, and the script is the
only writer: ops computed from state at checkpoint N - 1 are applied at checkpoint N - 1
or not at all. That is what lets several replicas share one key space safely.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tessera.events.v1.envelope_pb2 import EventEnvelope

# One Redis write command: its name, then its arguments. Binary values travel as bytes.
Op = tuple[str | bytes | int, ...]

# Commands a projection may emit; the apply script refuses anything else (see apply_events.lua).
# The first argument of each is the one key it writes.
ALLOWED_COMMANDS = frozenset({"SET", "DEL", "HSET", "HDEL", "HINCRBY", "ZADD", "ZREM", "SADD", "SREM"})


@dataclass(frozen=True, slots=True)
class Effect:
    """What applying one event changes: the ops to run and the new values of the state keys it wrote."""

    ops: Sequence[Op] = ()
    # New value (None = deleted) of every state key the ops change, so that the projector can
    # compute the next event of a catch-up batch before this one has reached Redis.
    state: Mapping[str, bytes | None] = field(default_factory=dict)


class PoisonEvent(Exception):
    """An event the projection cannot interpret (bad payload, unknown schema version)."""


class Projection(Protocol):
    """A named read model fed by the event stream, with its own checkpoint key."""

    @property
    def name(self) -> str:
        """Short name, used in logs and spans."""
        ...

    @property
    def checkpoint_key(self) -> str:
        """Redis key that holds the position of the last event applied to this read model."""
        ...

    @property
    def handles(self) -> frozenset[str]:
        """The event types (full proto names) whose effect may be more than moving the checkpoint.

        The projector projects only these; an event of any other type costs no script call of
        its own (its position rides along with the next write, or a batched marker).
        """
        ...

    def state_keys(self, envelope: EventEnvelope) -> Sequence[str]:
        """Keys (string values) whose current values `project` needs for this event."""
        ...

    def project(self, envelope: EventEnvelope, state: Mapping[str, bytes | None]) -> Effect:
        """The effect of `envelope` given the values of its state keys; raises PoisonEvent."""
        ...
