"""Generations: where in Redis each projection's views live, and how replicas agree on it.

A projection's views live in a key space named by the projection's version and a build
number, its *generation* (``v<version>g<build>``). Under the deployment's prefix ``P``:

    P meta:<name>:generation   string  the generation replicas serve (the pointer)
    P meta:<name>:builds       string  counter that numbers generations
    P meta:<name>:parked       hash    generation -> JSON of the event the projection stopped at
    P meta:<name>:skips        hash    v<version>:<position> -> JSON of an operator's skip
    P <name>@<generation>:     prefix of the generation's keys (its views and checkpoint)

The pointer doubles as the marker that Redis still holds what the replicas wrote: when it
disappears (a flush, a restart without persistence) the views are gone too. It is moved
only by compare-and-set, so replicas and the rebuild tool never race each other into a
half-built key space. A replica serves the pointer's generation when its version is the
replica's own; builds a new generation and switches to it when the pointer names an older
version (or nothing); and refuses to serve when the pointer names a newer version, because
it cannot read that shape.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import redis.asyncio as aioredis

from read_service.projections.base import Projection

_GENERATION = re.compile(r"^v(\d+)g(\d+)$")

# Compare-and-set of the pointer: ARGV[1] is the expected value ('' = absent), ARGV[2] the new one.
_SWITCH = """
local current = redis.call('GET', KEYS[1])
if (current == false and ARGV[1] == '') or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# Compare-and-delete of the pointer: remove it only while it still names ARGV[1].
_FORGET = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# Keys removed per UNLINK when an old key space is dropped.
UNLINK_BATCH = 1000


def pointer_key(base: str, name: str) -> str:
    """The key naming the generation of `name` that replicas serve."""
    return f"{base}meta:{name}:generation"


def builds_key(base: str, name: str) -> str:
    """The counter that numbers the generations of `name`."""
    return f"{base}meta:{name}:builds"


def parked_key(base: str, name: str) -> str:
    """The hash of parked events of `name`, one per generation."""
    return f"{base}meta:{name}:parked"


def skips_key(base: str, name: str) -> str:
    """The hash of operator skips of `name`, by version and position."""
    return f"{base}meta:{name}:skips"


def skip_field(version: int, position: int) -> str:
    """The field of one skip in skips_key: a skip holds for the code version it was given for."""
    return f"v{version}:{position}"


def keyspace_prefix(base: str, name: str, generation: str) -> str:
    """The prefix of every key of one generation of `name`.

    The braces make `name@generation` the keys' Redis Cluster hash tag: every key one apply
    script call writes (a projection's views and its checkpoint) hashes to one slot.
    """
    return f"{base}{{{name}@{generation}}}:"


def checkpoint_key(base: str, name: str, generation: str) -> str:
    """The checkpoint key of one generation (every keys class keeps it at `<prefix><name>:checkpoint`)."""
    return f"{keyspace_prefix(base, name, generation)}{name}:checkpoint"


async def served_checkpoint(client: aioredis.Redis, base: str, name: str) -> int:
    """The checkpoint of the generation replicas serve (0 when there is none), for tools and tests."""
    generation = _text(await client.get(pointer_key(base, name)))
    if generation is None:
        return 0
    return int(await client.get(checkpoint_key(base, name, generation)) or 0)


def generation_name(version: int, build: int) -> str:
    """The name of a generation."""
    return f"v{version}g{build}"


def generation_version(generation: str) -> int:
    """The projection version a generation was built by; ValueError for anything else."""
    match = _GENERATION.match(generation)
    if match is None:
        raise ValueError(f"not a generation name: {generation!r}")
    return int(match.group(1))


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value


class Plan(enum.Enum):
    """What a replica does with a projection's key space."""

    SERVE = "serve"  # the pointer names this version: serve (and keep applying to) it
    BUILD = "build"  # the pointer names an older version or nothing: build a new one, then switch
    OUTDATED = "outdated"  # the pointer names a newer version: do not serve this projection


@dataclass(frozen=True, slots=True)
class Resolution:
    """The plan for one projection and the generations involved."""

    plan: Plan
    generation: str  # the one to serve, or to build
    replaces: str | None  # BUILD: the pointer's value when the build started (None = absent)


@dataclass(frozen=True, slots=True)
class ParkedEvent:
    """An event a projection raised on, recorded where operators look."""

    projection: str
    generation: str
    position: int
    event_id: str
    event_type: str
    aggregate_type: str
    aggregate_id: str
    error: str
    parked_at: str

    def to_json(self) -> str:
        """The record as stored in Redis."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> ParkedEvent:
        """Parse a stored record."""
        data: dict[str, Any] = json.loads(raw)
        return cls(**data)


class Generations:
    """The pointer, build counter, parked records and skips of one projection under one prefix."""

    def __init__(
        self,
        client: aioredis.Redis,
        base: str,
        name: str,
        version: int,
        *,
        factory: Callable[[str], Projection],
        on_switch: Callable[[str], None] | None = None,
    ) -> None:
        if version < 1:
            raise ValueError("a projection version is a positive integer")
        self.client = client
        self.base = base
        self.name = name
        self.version = version
        self.factory = factory
        # Told the key prefix the replica's queries must read from, whenever it changes.
        self.on_switch = on_switch
        self.pointer = pointer_key(base, name)

    def prefix(self, generation: str) -> str:
        """The key prefix of one generation of this projection."""
        return keyspace_prefix(self.base, self.name, generation)

    async def current(self) -> str | None:
        """The generation replicas serve (None: none yet, or Redis lost it)."""
        return _text(await self.client.get(self.pointer))

    async def new_generation(self) -> str:
        """A generation name for this version never used before under this prefix."""
        build = int(await self.client.incr(builds_key(self.base, self.name)))
        return generation_name(self.version, build)

    async def resolve(self) -> Resolution:
        """Decide what this replica does with the projection (see the module docstring)."""
        current = await self.current()
        if current is None:
            generation = await self.new_generation()
            # The first replica claims the pointer at once and fills the (empty) key space in
            # place, not ready until caught up; replicas starting together share it.
            if await self.switch(None, generation):
                return Resolution(Plan.SERVE, generation, None)
            current = await self.current()
            if current is None:
                return await self.resolve()
        try:
            version = generation_version(current)
        except ValueError:
            version = 0  # foreign data under our pointer: rebuild over it
        if version == self.version:
            return Resolution(Plan.SERVE, current, None)
        if version > self.version:
            return Resolution(Plan.OUTDATED, current, None)
        return Resolution(Plan.BUILD, await self.new_generation(), current)

    async def switch(self, expected: str | None, generation: str) -> bool:
        """Point replicas at `generation` if the pointer still says `expected`; True if it moved."""
        moved = await self.client.eval(_SWITCH, 1, self.pointer, expected or "", generation)
        return bool(moved)

    async def forget(self, generation: str) -> bool:
        """Stop serving `generation` if the pointer still names it: every replica then builds anew
        from the log, as after a lost Redis. True if this call removed the pointer."""
        return bool(await self.client.eval(_FORGET, 1, self.pointer, generation))

    async def drop(self, generation: str) -> int:
        """UNLINK every key of `generation` in batches; return how many were removed."""
        return await drop_keyspace(self.client, self.prefix(generation))

    async def park(self, event: ParkedEvent) -> None:
        """Record the event the projection stopped at, for the generation it was applying to."""
        await self.client.hset(parked_key(self.base, self.name), event.generation, event.to_json())

    async def unpark(self, generation: str) -> None:
        """Remove the parked record of `generation` (the projection moved past it)."""
        await self.client.hdel(parked_key(self.base, self.name), generation)

    async def skipped(self, position: int) -> dict[str, Any] | None:
        """The operator's skip of `position` for this version, if there is one."""
        raw = await self.client.hget(skips_key(self.base, self.name), skip_field(self.version, position))
        if raw is None:
            return None
        data: dict[str, Any] = json.loads(raw)
        return data


async def drop_keyspace(client: aioredis.Redis, prefix: str, batch: int = UNLINK_BATCH) -> int:
    """UNLINK every key under `prefix`, `batch` keys per call; return how many were removed."""
    removed = 0
    pending: list[bytes | str] = []
    async for key in client.scan_iter(match=f"{_escape(prefix)}*", count=batch):
        pending.append(key)
        if len(pending) >= batch:
            removed += int(await client.unlink(*pending))
            pending = []
    if pending:
        removed += int(await client.unlink(*pending))
    return removed


def _escape(prefix: str) -> str:
    # SCAN MATCH is a glob: the prefix must match itself only.
    return re.sub(r"([*?\[\]\\])", r"\\\1", prefix)


async def parked_events(client: aioredis.Redis, base: str) -> list[ParkedEvent]:
    """Every parked event recorded under `base`, of every projection and generation."""
    found: list[ParkedEvent] = []
    async for key in client.scan_iter(match=f"{_escape(base)}meta:*:parked", count=1000):
        records = await client.hgetall(key)
        found.extend(ParkedEvent.from_json(raw) for raw in records.values())
    return sorted(found, key=lambda p: (p.projection, p.generation, p.position))


def rebase_keys(keys: object, prefix: str) -> None:
    """Point a keys object built from a prefix (UserKeys and the like) at another key space.

    The keys classes derive every key from the prefix given to their constructor, so building
    the same object again from the new prefix moves every query that holds it at once.
    """
    init: Callable[[object, str], None] = getattr(type(keys), "__init__")  # noqa: B009 - typed as taking a prefix
    init(keys, prefix)


def replica_generations(
    client: aioredis.Redis,
    base: str,
    projection: Projection,
    factory: Callable[[str], Projection],
    *query_keys: object,
) -> Generations:
    """The Generations of one of a replica's projections, moving `query_keys` along with each switch."""

    def on_switch(prefix: str) -> None:
        for keys in query_keys:
            rebase_keys(keys, prefix)

    version = int(getattr(projection, "version", 1))
    return Generations(client, base, projection.name, version, factory=factory, on_switch=on_switch)
