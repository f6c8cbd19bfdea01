"""Blue/green rebuilds: a projection rebuilt from the Postgres event log into a fresh generation.

The old generation keeps serving while the new one is written; then the pointer moves by
compare-and-set (read_service.generations), every replica follows it within a probe
interval, and after a grace period the old key space is UNLINKed in batches.

Writing a generation nobody else writes yet needs none of the live path's care: events are
read in batches through a server-side cursor (one REPEATABLE READ snapshot), each payload is
decoded once by the projection, the state an event needs comes from an in-memory overlay of
what the build wrote (the key space starts empty), and each batch's ops go to Redis in one
pipeline with the checkpoint last. A build stopped half-way is never switched to.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import asyncpg
import redis.asyncio as aioredis

from read_service.applier import parked_record, project_run
from read_service.context import ParkingMode
from read_service.generations import Generations, ParkedEvent, drop_keyspace, skip_field, skips_key
from read_service.keys import CatalogKeys, OrderKeys, UserKeys
from read_service.projections.base import Op, Projection
from read_service.projections.catalog import CatalogProjection
from read_service.projections.orders import OrdersProjection
from read_service.projections.users import UsersProjection
from read_service.sequences import ParkedSequences, sequences_key
from shared_kernel.contracts.event_log import ENVELOPE_COLUMNS, envelope_from_row, head_position
from tessera.events.v1.envelope_pb2 import EventEnvelope

DEFAULT_BATCH_SIZE = 5000
DEFAULT_GRACE_S = 2.0
# Catch-up passes over what arrived during the main pass, before the switch.
_TAIL_PASSES = 5


@dataclass(frozen=True, slots=True)
class ProjectionSpec:
    """How to build a projection of a given name and version on a key prefix."""

    name: str
    version: int
    factory: Callable[[str], Projection]


def _users(prefix: str) -> Projection:
    return UsersProjection(UserKeys(prefix))


def _catalog(prefix: str) -> Projection:
    return CatalogProjection(CatalogKeys(prefix))


def _orders(prefix: str) -> Projection:
    return OrdersProjection(OrderKeys(prefix))


def registered_projections() -> dict[str, ProjectionSpec]:
    """Every projection a replica runs, by name: what `admin rebuild` can rebuild."""
    specs = [
        ProjectionSpec(cls.name, int(getattr(cls, "version", 1)), factory)
        for cls, factory in ((UsersProjection, _users), (CatalogProjection, _catalog), (OrdersProjection, _orders))
    ]
    return {spec.name: spec for spec in specs}


class RebuildParked(Exception):
    """The projection raised on an event during a rebuild; the build was abandoned."""

    def __init__(self, record: ParkedEvent) -> None:
        super().__init__(f"{record.projection} raised on the event at position {record.position}: {record.error}")
        self.record = record


class RebuildConflict(Exception):
    """The pointer moved while the rebuild ran (another rebuild or a replica switched it)."""


@dataclass(frozen=True, slots=True)
class RebuildResult:
    """What one rebuild did."""

    projection: str
    generation: str
    replaced: str | None
    events: int
    checkpoint: int
    elapsed_s: float
    dropped_keys: int

    @property
    def events_per_s(self) -> float:
        """Throughput of the build (the switch and the drop excluded)."""
        return self.events / self.elapsed_s if self.elapsed_s > 0 else 0.0


class Progress:
    """A one-line progress bar on a stream: events done, percentage, events/s and ETA."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, interval_s: float = 0.2) -> None:
        self.label = label
        self.total = max(total, 0)
        self.stream = stream
        self.interval_s = interval_s
        self.done = 0
        self.started = time.monotonic()
        self._shown_at = 0.0
        self._tty = bool(stream is not None and stream.isatty())

    def advance(self, count: int, total: int | None = None) -> None:
        """Count `count` more events (and move the total when the log grew)."""
        self.done += count
        if total is not None:
            self.total = max(self.total, total)
        now = time.monotonic()
        if now - self._shown_at >= (self.interval_s if self._tty else 2.0):
            self._shown_at = now
            self._show(final=False)

    def finish(self) -> None:
        """Show the final line."""
        self._show(final=True)

    def line(self) -> str:
        """The progress line as it is shown."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        total = max(self.total, self.done)
        share = self.done / total if total else 1.0
        width = 30
        filled = int(width * share)
        bar = "#" * filled + "-" * (width - filled)
        eta = (total - self.done) / rate if rate > 0 else 0.0
        return (
            f"{self.label} [{bar}] {self.done:,}/{total:,} events {share:6.1%} "
            f"{rate:,.0f} events/s ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        )

    def _show(self, final: bool) -> None:
        if self.stream is None:
            return
        end = "\n" if final or not self._tty else ""
        prefix = "\r" if self._tty else ""
        self.stream.write(prefix + self.line() + end)
        self.stream.flush()


async def _skips(client: aioredis.Redis, base: str, name: str, version: int) -> set[int]:
    raw = await client.hkeys(skips_key(base, name))
    wanted = skip_field(version, 0).rsplit(":", 1)[0] + ":"
    positions: set[int] = set()
    for field in raw:
        text = field.decode() if isinstance(field, bytes) else str(field)
        if text.startswith(wanted):
            positions.add(int(text[len(wanted) :]))
    return positions


# Commands whose arguments after the key can be concatenated into the previous call on that key.
_VARIADIC = frozenset({"ZADD", "ZREM", "SADD", "SREM", "HSET", "HDEL"})


def coalesce(ops: Sequence[Op]) -> list[Op]:
    """Fewer commands with the same effect, for a key space nobody else writes meanwhile.

    Commands on different keys commute, so a command only ever merges into the last command
    on its own key: ZADD a 0 x + ZADD a 0 y = ZADD a 0 x 0 y (likewise ZREM, SADD, SREM,
    HSET, HDEL); SET after SET keeps the second; HINCRBY of one field adds up while nothing
    else touched the hash in between. Order on every key is kept, so the result is exact.
    """
    out: list[list[Any]] = []
    last: dict[Any, int] = {}  # key -> index in `out` of the last command on it
    barrier: dict[Any, int] = {}  # key -> index of its last command other than HINCRBY
    increments: dict[tuple[Any, Any], int] = {}  # (key, field) -> index of a HINCRBY
    for op in ops:
        command = str(op[0]).upper()
        key = op[1]
        index = last.get(key)
        previous = out[index] if index is not None else None
        if command == "HINCRBY" and len(op) == 4:
            at = increments.get((key, op[2]))
            if at is not None and at > barrier.get(key, -1):
                merged = out[at]
                merged[3] = int(merged[3]) + int(op[3])
                continue
            increments[(key, op[2])] = len(out)
        elif previous is not None and command in _VARIADIC and str(previous[0]).upper() == command:
            previous.extend(op[2:])
            continue
        elif (
            previous is not None
            and command == "SET"
            and len(op) == len(previous) == 3
            and str(previous[0]).upper() == "SET"
        ):
            previous[2] = op[2]
            continue
        if command != "HINCRBY":
            barrier[key] = len(out)
        last[key] = len(out)
        out.append(list(op))
    return [tuple(op) for op in out]


class _Writer:
    """Projects runs of events into a fresh key space, in pipelines, the checkpoint last."""

    def __init__(
        self,
        client: aioredis.Redis,
        projection: Projection,
        generation: str,
        skipped: set[int],
        sequences: ParkedSequences | None,
    ) -> None:
        self.client = client
        self.projection = projection
        self.generation = generation
        self.skipped = skipped
        # Aggregate parking: the build parks aggregates in its own key space, as a replica would.
        self.sequences = sequences
        self.overlay: dict[str, bytes | None] = {}
        self.checkpoint = 0
        self.events = 0
        self._pending: asyncio.Task[Any] | None = None

    async def project(self, envelopes: Sequence[EventEnvelope]) -> tuple[list[Op], int] | None:
        """The ops of the run that continues the checkpoint; None when a hole stops it at once."""
        run: list[EventEnvelope] = []
        for envelope in envelopes:
            if envelope.position != self.checkpoint + len(run) + 1:
                break  # a hole (a position not committed yet): stop, the tail pass retries
            run.append(envelope)
        if not run:
            return None

        async def skipped(envelope: EventEnvelope, _exc: BaseException) -> bool:
            return envelope.position in self.skipped

        projected = await project_run(self.projection, run, self.overlay, skipped=skipped, sequences=self.sequences)
        if projected.poison is not None and projected.error is not None:
            record = parked_record(self.projection.name, self.generation, projected.poison, projected.error)
            raise RebuildParked(record) from projected.error
        ops = [op for _, effect in projected.effects for op in effect.ops]
        return ops, run[-1].position

    async def write(self, ops: list[Op], position: int) -> None:
        """Send one run's ops and then its checkpoint; overlaps with reading the next run."""
        await self.flush()
        client = self.client
        checkpoint_key = self.projection.checkpoint_key

        async def send() -> None:
            async with client.pipeline(transaction=False) as pipe:
                for op in coalesce(ops):
                    pipe.execute_command(*op)
                pipe.set(checkpoint_key, position)
                await pipe.execute()

        self.events += position - self.checkpoint
        self.checkpoint = position
        self._pending = asyncio.create_task(send())

    async def flush(self) -> None:
        """Wait for the run in flight."""
        pending, self._pending = self._pending, None
        if pending is not None:
            await pending

    async def abandon(self) -> None:
        """Stop the run in flight, if any."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending


_SELECT = (
    f"SELECT {ENVELOPE_COLUMNS} FROM outbox "  # noqa: S608 - fixed columns, bound values
    "WHERE position > $1 AND position <= $2 ORDER BY position"
)


async def _pass(
    pool: asyncpg.Pool[Any], writer: _Writer, head: int, batch_size: int, progress: Progress | None
) -> None:
    """Apply the log from the writer's checkpoint up to `head` (or the first hole)."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        cursor = await conn.cursor(_SELECT, writer.checkpoint, head)
        while True:
            rows = await cursor.fetch(batch_size)
            if not rows:
                break
            envelopes = [envelope_from_row(row) for row in rows]
            run = await writer.project(envelopes)
            if run is None:
                break
            ops, position = run
            done_before = writer.events
            await writer.write(ops, position)
            if progress is not None:
                progress.advance(writer.events - done_before, total=head)
            if position != envelopes[-1].position:
                break
    await writer.flush()


async def rebuild(
    client: aioredis.Redis,
    pool: asyncpg.Pool[Any],
    base: str,
    spec: ProjectionSpec,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    grace_s: float = DEFAULT_GRACE_S,
    stream: TextIO | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    parking: ParkingMode = ParkingMode.AGGREGATE,
) -> RebuildResult:
    """Build a new generation of `spec` from the event log, switch replicas to it, drop the old one.

    With aggregate parking an event the projection raises on parks its aggregate in the new
    generation, as a replica would (decision 0029); with projection parking it abandons the build.
    """
    generations = Generations(client, base, spec.name, spec.version, factory=spec.factory)
    replaced = await generations.current()
    generation = await generations.new_generation()
    prefix = generations.prefix(generation)
    projection = spec.factory(prefix)
    sequences = (
        ParkedSequences(sequences_key(prefix, spec.name), projection, generation, {})
        if parking is ParkingMode.AGGREGATE
        else None
    )
    writer = _Writer(client, projection, generation, await _skips(client, base, spec.name, spec.version), sequences)
    head = await head_position(pool)
    progress = Progress(f"{spec.name} {generation}", head, stream)
    started = time.monotonic()
    try:
        await _pass(pool, writer, head, batch_size, progress)
        # Events keep arriving while the build runs: close most of that distance before the
        # switch, so that replicas switching over have only a few events to catch up.
        for _ in range(_TAIL_PASSES):
            head = await head_position(pool)
            if head <= writer.checkpoint:
                break
            await _pass(pool, writer, head, batch_size, progress)
    except BaseException as exc:
        await writer.abandon()
        if isinstance(exc, RebuildParked):
            await generations.park(exc.record)
        await drop_keyspace(client, generations.prefix(generation))
        raise
    elapsed = time.monotonic() - started
    progress.finish()
    if not await generations.switch(replaced, generation):
        await drop_keyspace(client, generations.prefix(generation))
        raise RebuildConflict(
            f"the pointer of {spec.name} moved from {replaced} to {await generations.current()} during the rebuild"
        )
    dropped = 0
    if replaced is not None:
        # Replicas follow the pointer within a probe interval; queries already running on the
        # old key space finish within the grace period.
        await sleep(grace_s)
        dropped = await drop_keyspace(client, generations.prefix(replaced))
        await generations.unpark(replaced)
    return RebuildResult(spec.name, generation, replaced, writer.events, writer.checkpoint, elapsed, dropped)


def default_stream() -> TextIO:
    """Where progress goes: standard error."""
    return sys.stderr
