"""Parked sequences: one aggregate's events held back behind an event its projection cannot apply.

With aggregate parking (decision 0029, the default) an event the projection raises on parks
its aggregate's *sequence*: that event, and every later event of the same aggregate, change
nothing but the checkpoint, which still moves by exactly one per position. Every other
aggregate goes on. The parked state lives in the projection's own key space, one hash under
its hash tag, written by the same apply script call that moves the checkpoint over the event:

    K <name>:parked             hash  <aggregate type>/<aggregate id> -> JSON of a ParkedEvent:
                                      the first held position, its error, and how many events
                                      of the aggregate were held after it (`held`, `last_position`)
    K <name>:parking-requests   hash  the same field -> JSON of an operator's retry or skip
    P meta:<name>:parking-log   list  what operators asked and what came of it (newest first)

(K is the key space's prefix: the generation's, or the fixed one; P the deployment's.) Because
the record moves atomically with the checkpoint, the events a parked aggregate holds are
exactly the events of its sequence in the log from the parked position up to the checkpoint: a
retry reads them back from the log (read_service.parking). A sequence is the event's aggregate
unless the projection defines `sequence_of` (the orders view: StockReserved joins its order's).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis

from read_service.applier import parked_record
from read_service.generations import ParkedEvent, keyspace_prefix, pointer_key
from read_service.projections.base import Effect, Projection
from tessera.events.v1.envelope_pb2 import EventEnvelope

# Entries kept in the parking log.
LOG_LENGTH = 1000


def sequences_key(keyspace: str, name: str) -> str:
    """The hash of parked aggregates of `name` in the key space with prefix `keyspace`."""
    return f"{keyspace}{name}:parked"


def requests_key(keyspace: str, name: str) -> str:
    """The hash of operators' retry and skip requests, by aggregate."""
    return f"{keyspace}{name}:parking-requests"


def log_key(base: str, name: str) -> str:
    """The list recording operators' requests and their outcomes."""
    return f"{base}meta:{name}:parking-log"


def keyspace_of(checkpoint_key: str, name: str) -> str:
    """The key space prefix a projection's checkpoint key lives under (`<prefix><name>:checkpoint`)."""
    return checkpoint_key.removesuffix(f"{name}:checkpoint")


def sequence_field(aggregate_type: str, aggregate_id: str) -> str:
    """The field of one aggregate in the parked and request hashes."""
    return f"{aggregate_type}/{aggregate_id}"


def sequence_of(projection: Projection, envelope: EventEnvelope) -> str:
    """The sequence an event belongs to: its aggregate, unless the projection says otherwise.

    A projection whose view of one aggregate also takes events of another (the orders view takes
    the catalog's StockReserved of the order) defines `sequence_of`, so that those wait too.
    """
    of: Callable[[EventEnvelope], str] | None = getattr(projection, "sequence_of", None)
    if of is not None:
        return of(envelope)
    return sequence_field(envelope.aggregate_type, envelope.aggregate_id)


def sequence_id(field: str) -> str:
    """The id part of a sequence's field (the aggregate id queries know)."""
    return field.partition("/")[2]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def decode_records(raw: Mapping[Any, Any]) -> dict[str, ParkedEvent]:
    """An HGETALL of a parked hash, by field."""
    return {_text(field): ParkedEvent.from_json(value) for field, value in raw.items()}


class ParkedSequences:
    """The parked aggregates of one projection's key space, as a run of events goes through them.

    Given to read_service.applier.project_run: an event of a parked aggregate is held (its
    effect only updates the record), and an event the projection raises on parks its aggregate.
    Each change is an op on the parked hash, so it is written with the checkpoint.
    """

    def __init__(self, key: str, projection: Projection, generation: str, records: dict[str, ParkedEvent]) -> None:
        self.key = key
        self.projection = projection
        self.generation = generation
        self.records = records
        # Parked by this run (for logs and counters).
        self.parked: list[ParkedEvent] = []

    def holding(self, envelope: EventEnvelope) -> bool:
        """True when the event's sequence is parked: the event goes behind it."""
        return bool(self.records) and sequence_of(self.projection, envelope) in self.records

    def hold(self, envelope: EventEnvelope) -> Effect:
        """The effect of a held event: its sequence's record counts it."""
        field = sequence_of(self.projection, envelope)
        record = self.records[field]
        record = replace(record, held=record.held + 1, last_position=envelope.position)
        self.records[field] = record
        return Effect(ops=(("HSET", self.key, field, record.to_json()),))

    def park(self, envelope: EventEnvelope, exc: BaseException) -> Effect:
        """The effect of an event the projection raised on: its aggregate is parked from here."""
        field = sequence_of(self.projection, envelope)
        record = replace(
            parked_record(self.projection.name, self.generation, envelope, exc), last_position=envelope.position
        )
        self.records[field] = record
        self.parked.append(record)
        return Effect(ops=(("HSET", self.key, field, record.to_json()),))


async def served_keyspace(client: aioredis.Redis, base: str, name: str) -> tuple[str, str]:
    """(key space prefix, generation) replicas serve for `name`: the pointer's, else the fixed one."""
    raw = await client.get(pointer_key(base, name))
    if raw is None:
        return base, ""
    generation = _text(raw)
    return keyspace_prefix(base, name, generation), generation


async def parked_aggregates(client: aioredis.Redis, base: str, name: str) -> list[tuple[str, ParkedEvent]]:
    """The sequences `name` holds parked in the served key space, as (field, record), by position."""
    keyspace, _ = await served_keyspace(client, base, name)
    records = decode_records(await client.hgetall(sequences_key(keyspace, name)))
    return sorted(records.items(), key=lambda item: item[1].position)


def find_parked(parked: list[tuple[str, ParkedEvent]], aggregate_id: str) -> tuple[str, ParkedEvent] | None:
    """The parked sequence an operator names by its id (or by the id of its first parked event's aggregate)."""
    for field, record in parked:
        if sequence_id(field) == aggregate_id or record.aggregate_id == aggregate_id:
            return field, record
    return None


async def pending_requests(client: aioredis.Redis, base: str, name: str) -> dict[str, dict[str, Any]]:
    """Operators' requests not yet carried out, by aggregate field."""
    keyspace, _ = await served_keyspace(client, base, name)
    raw = await client.hgetall(requests_key(keyspace, name))
    return {_text(field): json.loads(value) for field, value in raw.items()}


async def record_log(client: aioredis.Redis, base: str, name: str, entry: Mapping[str, Any]) -> None:
    """Add one entry to the parking log (the newest first, the oldest dropped past LOG_LENGTH)."""
    async with client.pipeline(transaction=True) as pipe:
        pipe.lpush(log_key(base, name), json.dumps(entry, sort_keys=True))
        pipe.ltrim(log_key(base, name), 0, LOG_LENGTH - 1)
        await pipe.execute()
