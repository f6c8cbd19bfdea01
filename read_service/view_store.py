"""Checkpointed writes to a Redis read model: the only code that writes views and checkpoints.

Every write goes through one Lua script (apply_events.lua, with ops.lua in front), loaded once
and called by EVALSHA, that compares each event's position with the checkpoint, runs the event's
ops, advances the checkpoint and stores the log fingerprint in one atomic step. A call's
segments and ops travel packed in one argument. A batch of events is one call: the events a
projection does not handle ride along as the start of the next segment (or as a trailing
marker), so they cost no call of their own. The script is given every key it writes in
KEYS. Reads of the prior state a projection needs are taken together with the checkpoint in
one MULTI/EXEC, so the state and the position it belongs to always match.
"""

from __future__ import annotations

import enum
import logging
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions

from read_service.log_guard import Fingerprint, fingerprint_key
from read_service.near_cache import NearCache, ObservedCheckpoint
from read_service.projections.base import Op
from read_service.read_pipeline import pack_evalsha, read_pipeline
from read_service.views.wire import view_bytes, view_field

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _script(name: str) -> str:
    # Each script runs with ops.lua in front: one text reads, checks and runs ops for both.
    files = resources.files("read_service")
    return files.joinpath("ops.lua").read_text(encoding="utf-8") + files.joinpath(name).read_text(encoding="utf-8")


_SCRIPT = _script("apply_events.lua")
_SETTLE_SCRIPT = _script("settle_parked.lua")


class Outcome(enum.IntEnum):
    """What applying one event did."""

    GAP = -1
    DUPLICATE = 0
    APPLIED = 1


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """One event's outcome and the checkpoint after it, as a call per event would have answered."""

    outcome: Outcome
    checkpoint: int


@dataclass(frozen=True, slots=True)
class Segment:
    """Events `first`..`last` of one projection: only the one at `last` has ops (maybe none)."""

    first: int
    last: int
    ops: Sequence[Op] = ()


def segments(events: Sequence[tuple[int, Sequence[Op]]], first: int | None = None) -> list[Segment]:
    """The segments of a batch: each event with ops takes the no-op events before it along.

    `first`, when given, is the position of an earlier no-op event the batch continues from
    (positions `first`..events[0] - 1 change nothing). A hole in the positions closes a segment.
    """
    result: list[Segment] = []
    if not events:
        return result
    previous = events[0][0] - 1
    start = events[0][0] if first is None else min(first, events[0][0])
    for position, ops in events:
        if position != previous + 1:
            if start <= previous:
                result.append(Segment(start, previous))
            start = position
        if ops:
            result.append(Segment(start, position, ops))
            start = position + 1
        previous = position
    if start <= previous:
        result.append(Segment(start, previous))
    return result


_SEGMENT_HEAD = struct.Struct(">III").pack


def _item(value: str | bytes | int | float) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, float):
        return repr(value).encode()
    return str(value).encode()


# Bytes of op arguments (packed) beyond which a batch is split into several script calls, sent
# in one pipeline: one call stays short for Redis (a long script holds every other client up;
# 32 kB is about 20 user registrations, a millisecond or two) and its MONITOR line stays
# readable. At 8 kB a catch-up page of registrations took four times as many calls, and the
# driver's work per call was a third of the replica's share of writing it.
CALL_BYTES = 32_000

# The script's KEYS and ARGV for one call.
Call = tuple[list[str], list[str | bytes | int]]


def encode(checkpoint_key: str, batch: Sequence[Segment], fingerprint: Fingerprint | None = None) -> Call:
    """The script's KEYS and ARGV for `batch` in one call (see apply_events.lua)."""
    ((keys, argv),) = encode_calls(checkpoint_key, batch, limit=None, fingerprint=fingerprint)
    return keys, argv


# Each allowed command's code in an op (its index in ops.lua's `commands`); 0 is refused there.
_CODES = {
    name: code for code, name in enumerate(("SET", "DEL", "HSET", "HDEL", "HINCRBY", "ZADD", "ZREM", "SADD", "SREM"), 1)
}
# The code of each command as the projections spell it, looked up once per process.
_CODE_OF: dict[object, int] = {}
# The packer of an op's header by its count of arguments after the key (see ops.lua).
_HEADERS: dict[int, Callable[..., bytes]] = {}


def _header(count: int) -> Callable[..., bytes]:
    if count > _FAN_OUT_MARK - 1:
        raise ValueError(f"an op takes at most {_FAN_OUT_MARK - 1} arguments after its key, not {count}")
    pack = _HEADERS[count] = struct.Struct(">BBI" + "I" * count).pack
    return pack


_ONE = struct.Struct(">BBII").pack
_TWO = struct.Struct(">BBIII").pack


def _bytes(value: str | bytes | int | float) -> bytes:
    kind = type(value)
    if kind is bytes:
        return value  # type: ignore[return-value]
    if kind is str:
        return value.encode()  # type: ignore[union-attr]
    if kind is int:
        # Scores and increments: most are the same few numbers (a score of 0, a count of 1).
        return _INTS.get(value) or str(value).encode()  # type: ignore[arg-type]
    return _item(value)


_INTS = {number: str(number).encode() for number in range(-16, 17)}


# At most this many keys in one fan-out op (see ops.lua): Lua unpacks their indexes in one call.
FAN_OUT_MAX = 200
_FAN_OUT = struct.Struct(">BBBI").pack
# The first byte of a fan-out op, where any other op has its argument count.
_FAN_OUT_MARK = 255
# What an op of one argument has in place of a second.
_NO_ARGUMENT = object()


def _emit_run(parts: list[bytes], code: int, slots: list[int], first: bytes, second: bytes | None) -> None:
    """Append a run of one command with the same arguments on `slots` (one op, or a fan-out op)."""
    append = parts.append
    if len(slots) == 1:
        if second is None:
            append(_ONE(1, code, slots[0], len(first)))
            append(first)
        else:
            append(_TWO(2, code, slots[0], len(first), len(second)))
            append(first)
            append(second)
        return
    append(_FAN_OUT(_FAN_OUT_MARK, code, 1 if second is None else 2, len(slots)))
    append(struct.pack(f">{len(slots)}I", *slots))
    if second is None:
        append(len(first).to_bytes(4, "big"))
        append(first)
    else:
        append(len(first).to_bytes(4, "big") + len(second).to_bytes(4, "big"))
        append(first)
        append(second)


def _pack_ops(
    ops: Sequence[Op], keys: list[str], slots: dict[str | bytes | int | float, int], parts: list[bytes]
) -> None:
    """Append `ops` packed (see ops.lua) to `parts`, adding each key not in `slots` to `keys`.

    Consecutive ops of one command with the very same arguments on different keys (an entity's
    trigram sets: one score, one member) go as one fan-out op: their key indexes, then the
    arguments once. Redis runs them as the ops they stand for, in the same order.
    """
    # The hot loop of every write: names bound locally, the run's arguments compared by identity.
    slot_of = slots.get
    code_of = _CODE_OF.get
    run: list[int] = []
    run_code = 0
    run_first: Any = None
    run_second: Any = None
    first_bytes = b""
    second_bytes: bytes | None = None
    for op in ops:
        key = op[1]
        slot = slot_of(key)
        if slot is None:
            keys.append(key.decode() if isinstance(key, bytes) else str(key))
            slot = slots[key] = len(keys)
        command = op[0]
        code = code_of(command)
        if code is None:
            code = _CODE_OF[command] = _CODES.get(str(command).upper(), 0)
        count = len(op) - 2
        if count in (1, 2):
            first = op[2]
            second = op[3] if count == 2 else _NO_ARGUMENT
            if run and code == run_code and first is run_first and second is run_second and len(run) < FAN_OUT_MAX:
                run.append(slot)
                continue
            if run:
                _emit_run(parts, run_code, run, first_bytes, second_bytes)
            run = [slot]
            run_code, run_first, run_second = code, first, second
            first_bytes = _bytes(first)
            second_bytes = None if count == 1 else _bytes(op[3])
            continue
        if run:
            _emit_run(parts, run_code, run, first_bytes, second_bytes)
            run = []
        args = [_bytes(value) for value in op[2:]]
        header = _HEADERS.get(count) or _header(count)
        parts.append(header(count, code, slot, *[len(arg) for arg in args]))
        parts.extend(args)
    if run:
        _emit_run(parts, run_code, run, first_bytes, second_bytes)


def pack_ops(keys: list[str], ops: Sequence[Op]) -> bytes:
    """`ops` packed in one string (see ops.lua), their keys added to `keys` (indexes count from 1)."""
    slots: dict[str | bytes | int | float, int] = {key: index for index, key in enumerate(keys, start=1)}
    parts: list[bytes] = []
    _pack_ops(ops, keys, slots, parts)
    return b"".join(parts)


def encode_calls(
    checkpoint_key: str,
    batch: Sequence[Segment],
    limit: int | None = CALL_BYTES,
    fingerprint: Fingerprint | None = None,
) -> list[Call]:
    """KEYS and ARGV of each script call for `batch`: every segment of a call packed in one string.

    A new call starts at a segment boundary once the packed ops of the current one pass
    `limit`. The `fingerprint`, if any, goes with the last call (it is stored after its segments).
    """
    calls: list[tuple[list[str], list[bytes]]] = []
    fingerprint_at = fingerprint_key(checkpoint_key)
    keys: list[str] = []
    # Each key's index in KEYS.
    slots: dict[str | bytes | int | float, int] = {}
    parts: list[bytes] = []
    size = 0
    for segment in batch:
        if not calls or (limit is not None and size > limit):
            if calls:
                calls[-1][1].append(b"".join(parts))
            keys, slots, parts, size = [checkpoint_key, fingerprint_at], {}, [], 0
            calls.append((keys, []))
        first, last = str(segment.first).encode(), str(segment.last).encode()
        ops: list[bytes] = []
        _pack_ops(segment.ops, keys, slots, ops)
        blob = b"".join(ops)
        size += len(blob)
        parts += (_SEGMENT_HEAD(len(segment.ops), len(first), len(last)), first, last, blob)
    result: list[Call] = []
    for index, (keys, argv) in enumerate(calls):
        if index == len(calls) - 1:
            argv.append(b"".join(parts))
        args: list[str | bytes | int] = list(argv)
        if fingerprint is not None and index == len(calls) - 1:
            args += [fingerprint.position, fingerprint.event_id]
        result.append((keys, args))
    return result


# The RESP bulk string of each key named lately: most keys of a write (an index, a trigram set)
# come back in write after write, and packing each key anew was as much work as packing its ops.
_BULKS: dict[str, bytes] = {}
_BULKS_MAX = 100_000


def _bulk_key(key: str) -> bytes:
    bulk = _BULKS.get(key)
    if bulk is None:
        data = key.encode()
        bulk = b"$%d\r\n%s\r\n" % (len(data), data)
        if len(_BULKS) >= _BULKS_MAX:
            _BULKS.clear()
        _BULKS[key] = bulk
    return bulk


def _bulk(value: str | bytes | int) -> bytes:
    data = value if isinstance(value, bytes) else str(value).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def pack_call(sha: str, keys: Sequence[str], argv: Sequence[str | bytes | int]) -> bytes:
    """EVALSHA `sha` with `keys` and `argv` in the Redis protocol."""
    bulks = _BULKS
    parts = [b"*%d\r\n$7\r\nEVALSHA\r\n" % (3 + len(keys) + len(argv)), _bulk(sha), _bulk(len(keys))]
    parts += [bulks.get(key) or _bulk_key(key) for key in keys]
    parts += [_bulk(value) for value in argv]
    return b"".join(parts)


def results(positions: Sequence[int], before: int, after: int) -> list[ApplyResult]:
    """Per-event outcomes of a call that moved the checkpoint from `before` to `after`."""
    return [
        ApplyResult(Outcome.DUPLICATE, before)
        if position <= before
        else ApplyResult(Outcome.APPLIED, position)
        if position <= after
        else ApplyResult(Outcome.GAP, after)
        for position in positions
    ]


class ViewStore:
    """Applies projection ops to Redis under one checkpoint key."""

    def __init__(self, client: aioredis.Redis, checkpoint_key: str) -> None:
        self._client = client
        self._checkpoint_key = checkpoint_key
        self._sha: str | None = None

    @property
    def checkpoint_key(self) -> str:
        """The Redis key holding the position of the last event applied."""
        return self._checkpoint_key

    async def load_script(self) -> None:
        """Load the apply script into Redis's script cache (again after a Redis restart)."""
        self._sha = await self._client.script_load(_SCRIPT)

    async def checkpoint(self) -> int:
        """The position of the last event applied (0 when none was)."""
        value = await self._client.get(self._checkpoint_key)
        return int(value or 0)

    async def snapshot(self, keys: Sequence[str]) -> tuple[int, dict[str, bytes | None]]:
        """The checkpoint and the values of `keys`, read in one atomic step."""
        if not keys:
            return await self.checkpoint(), {}
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.get(self._checkpoint_key)
            pipe.mget(list(keys))
            checkpoint_raw, values = await pipe.execute()
        return int(checkpoint_raw or 0), dict(zip(keys, values, strict=True))

    async def snapshot_parked(
        self, keys: Sequence[str], parked_key: str
    ) -> tuple[int, dict[str, bytes | None], dict[bytes | str, bytes | str]]:
        """The checkpoint, the values of `keys` and the parked hash (read_service.sequences), atomically."""
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.get(self._checkpoint_key)
            if keys:
                pipe.mget(list(keys))
            pipe.hgetall(parked_key)
            replies = await pipe.execute()
        values = dict(zip(keys, replies[1], strict=True)) if keys else {}
        return int(replies[0] or 0), values, replies[-1]

    async def settle(self, checkpoint: int, parked_key: str, field: str, record: bytes, ops: Sequence[Op]) -> bool:
        """Run `ops` (which write `parked_key`) if the checkpoint and the record are still as read; True if run."""
        keys = [self._checkpoint_key]
        packed = pack_ops(keys, ops)
        raw = await self._client.eval(
            _SETTLE_SCRIPT, len(keys), *keys, checkpoint, keys.index(parked_key) + 1, field, record, packed
        )
        return bool(raw)

    async def apply(self, position: int, ops: Sequence[Op]) -> ApplyResult:
        """Apply one event's ops if `position` is the checkpoint + 1."""
        results = await self.apply_many([(position, ops)])
        return results[0]

    async def apply_many(
        self, events: Sequence[tuple[int, Sequence[Op]]], *, first: int | None = None
    ) -> list[ApplyResult]:
        """Apply events in order in one script call; each answers as a call of its own would.

        `first`: see segments(); the checkpoint then moves over those earlier no-op events too.
        """
        if not events:
            return []
        before, after = await self.write(segments(events, first))
        return results([position for position, _ in events], before, after)

    async def write(self, batch: Sequence[Segment], fingerprint: Fingerprint | None = None) -> tuple[int, int]:
        """Run the apply script on `batch` (one call, or several in one pipeline); the checkpoint before and after.

        `fingerprint` (an event the writer saw, see read_service.log_guard) is stored by the
        same script call, after the segments.
        """
        moves = await self.write_calls(batch, fingerprint)
        # Each call starts where the one before it left the checkpoint (a gap leaves it as it is).
        return moves[0][0], moves[-1][1]

    async def write_calls(
        self, batch: Sequence[Segment], fingerprint: Fingerprint | None = None
    ) -> list[tuple[int, int]]:
        """As write(), but the checkpoint before and after each call of the pipeline.

        Another writer of the key space may run between two calls: the positions this writer
        applied are those of each call's own move, not everything from the first to the last.
        """
        calls = encode_calls(self._checkpoint_key, batch, fingerprint=fingerprint)
        try:
            raw = await self._call(calls)
        except redis.exceptions.NoScriptError:
            # Redis restarted (or SCRIPT FLUSH ran) since the script was loaded. Re-running
            # the whole batch is safe: events already applied come back as duplicates.
            logger.info("apply script missing from Redis's cache; loading it again")
            await self.load_script()
            raw = await self._call(calls)
        return [(int(before), int(after)) for before, after in raw]

    async def fingerprint(self) -> Fingerprint | None:
        """The fingerprint stored with the last write (None before the first)."""
        return Fingerprint.decode(await self._client.get(fingerprint_key(self._checkpoint_key)))

    async def _call(self, calls: list[Call]) -> list[Any]:
        if self._sha is None:
            await self.load_script()
        sha = self._sha
        assert sha is not None
        packed = b"".join([pack_call(sha, keys, argv) for keys, argv in calls])
        pool = self._client.connection_pool
        for attempt in (1, 2):
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            answered = 0
            try:
                await connection.send_packed_command(packed)
                replies: list[Any] = []
                error: redis.exceptions.ResponseError | None = None
                for _ in calls:
                    try:
                        replies.append(await connection.read_response())
                    except redis.exceptions.ResponseError as exc:
                        # Read every reply of the batch first: the connection stays in step.
                        error = error or exc
                    answered += 1
            except (redis.exceptions.ConnectionError, OSError) as exc:
                await connection.disconnect(nowait=True)
                # A pooled connection Redis had closed (a restart): sent once more on a new one,
                # as the driver's own retry does. Nothing was applied by a call that never answered
                # back, and a call that did comes back as a duplicate, which the script refuses.
                if attempt == 2 or answered:
                    raise
                logger.debug("apply call on a closed connection (%s); sending it again", exc)
                continue
            except BaseException:
                # Cancelled or timed out: what is still on the wire is unknown.
                await connection.disconnect(nowait=True)
                raise
            finally:
                await pool.release(connection)
            if error is not None:
                raise error
            return replies
        raise AssertionError("unreachable")


# Reads what one single-view query needs in one command: KEYS[1] the checkpoint, KEYS[2] the
# view, any further KEYS hashes the view merges (a user's spending). Redis runs a script
# atomically, so the view reflects exactly that checkpoint. Replies {checkpoint, 1|0 (the view
# exists), view or '', HGETALL of each hash}: a Lua nil would end the reply's array early.
_READ_VIEW_SCRIPT = """
local view = redis.call('GET', KEYS[2])
local reply = {redis.call('GET', KEYS[1]) or '0', view and 1 or 0, view or ''}
for index = 3, #KEYS do
  reply[#reply + 1] = redis.call('HGETALL', KEYS[index])
end
return reply
"""


@dataclass(frozen=True, slots=True)
class ViewRead:
    """What `read_view` found: the checkpoint's raw value, the view (None when absent) and each hash."""

    checkpoint: bytes | str | None
    view: bytes | None
    hashes: list[dict[bytes | str, bytes | str]]


class ViewReader:
    """Reads a checkpoint, a view and the hashes it merges in one script call: one command, one reply.

    A pipeline of GET, GET and HGETALL costs the same single round trip, but three commands
    to pack, three replies to parse and three read timeouts in the driver; on a replica's
    cold path that was most of the query's own work.
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._sha: str | None = None
        # Sent with the other queries' reads of the moment, on one connection (read_service.read_pipeline).
        self._pipeline = read_pipeline(client)

    async def read(self, checkpoint_key: str, view_key: str, *hash_keys: str) -> ViewRead:
        """The checkpoint, the view and the hashes, read atomically."""
        keys = (checkpoint_key, view_key, *hash_keys)
        try:
            if self._sha is None:
                self._sha = await self._client.script_load(_READ_VIEW_SCRIPT)
            raw = await self._pipeline.execute(pack_evalsha(self._sha, keys))
        except redis.exceptions.NoScriptError:
            # Redis restarted (or SCRIPT FLUSH ran) since the script was loaded.
            self._sha = await self._client.script_load(_READ_VIEW_SCRIPT)
            raw = await self._pipeline.execute(pack_evalsha(self._sha, keys))
        checkpoint, exists, view, *hashes = raw
        return ViewRead(
            checkpoint,
            (view if isinstance(view, bytes) else str(view).encode()) if exists else None,
            [_pairs(flat) for flat in hashes],
        )


def _pairs(flat: Any) -> dict[bytes | str, bytes | str]:
    # HGETALL inside a script answers a flat list of fields and values.
    if isinstance(flat, dict):
        return flat
    return dict(zip(flat[::2], flat[1::2], strict=True))


class CheckpointReader:
    """A query's read of a projection's checkpoint: a call of its own, or queued in the query's read.

    Calling it reads the checkpoint alone. A query that reads its view in one command (the
    read script of ViewReader) reads `key` in that command instead (Redis runs it atomically,
    so the view read reflects at least that checkpoint) and passes the value to `verify`,
    with what `known` said just before: one round trip instead of two.
    """

    def __init__(
        self,
        store: Callable[[], ViewStore],
        known: Callable[[], int],
        verify: Callable[[int, int], Awaitable[int]],
    ) -> None:
        self._store = store
        self._known = known
        self._verify = verify
        self._loss_listeners: list[Callable[[], None]] = []

    def on_loss(self, listener: Callable[[], None]) -> None:
        """Call `listener` whenever the key space this checkpoint belongs to is lost or replaced."""
        self._loss_listeners.append(listener)

    def key_space_lost(self) -> None:
        """The projector stopped serving or switched key space: tell the listeners (near caches)."""
        for listener in self._loss_listeners:
            listener()

    @property
    def key(self) -> str:
        """The checkpoint key to read now (it changes when the projector switches generations)."""
        return self._store().checkpoint_key

    def known(self) -> int:
        """The checkpoint the projector knows now; take it before the read, pass it to `verify`."""
        return self._known()

    async def verify(self, checkpoint: int, known: int) -> int:
        """Check a checkpoint read from Redis against `known` (raises when Redis lost data); return it."""
        return await self._verify(checkpoint, known)

    async def __call__(self) -> int:
        """Read the checkpoint in a round trip of its own, and verify it."""
        known = self._known()
        return await self._verify(await self._store().checkpoint(), known)


class QueryCheckpoint:
    """The checkpoint one query reports as `view_position`, read by the view's own read when it can.

    A view that reads in one command asks `pipelined()` for the checkpoint key, reads it with
    the view (ViewReader) and hands the value to `settle`: one round trip for both. Any
    other read calls `read()` first, a round trip of its own. Either way `position` is the
    checkpoint the reply reflects at least, and the near cache (if any) is told about it.
    """

    __slots__ = ("_cache", "_memory", "_read", "_reader", "position")

    def __init__(self, read: Callable[[], Awaitable[int]] | None, *, memory: bool = True) -> None:
        self._read = read
        # False for a query that waited for a consistency token (see from_memory).
        self._memory = memory
        self._cache: NearCache | None = None
        inner: object = read
        if isinstance(read, ObservedCheckpoint):
            self._cache = read.cache
            inner = read.read
        self._reader = inner if isinstance(inner, CheckpointReader) else None
        self.position = 0

    def pipelined(self) -> tuple[str, int] | None:
        """(checkpoint key, checkpoint known now) for a read that takes the checkpoint itself; None if it cannot."""
        if self._reader is None:
            return None
        return self._reader.key, self._reader.known()

    def from_memory(self, cache: NearCache, key: str) -> tuple[Any] | None:
        """`(value,)` of `key` from the near cache at the projector's checkpoint, no Redis call; else None.

        On a hit `position` is the checkpoint the projector knows now (see NearCache.peek). Not
        for a query that waited for a consistency token: the wait saw the token's version in
        Redis, which may be ahead of the projector's in-memory checkpoint (the projector updates
        it after its write returns; a lease follower learns it later), so that query reads Redis.
        """
        if self._reader is None or not self._memory or not cache.enabled:
            return None
        known = self._reader.known()
        hit = cache.peek(key, known)
        if hit is not None:
            self.position = known
        return hit

    async def settle(self, raw: bytes | str | None, known: int) -> int:
        """Verify the checkpoint value a pipelined read got (raises when Redis lost data); remember it."""
        assert self._reader is not None
        self.position = await self._reader.verify(int(raw or 0), known)
        if self._cache is not None:
            self._cache.report(self.position)
        return self.position

    async def read(self) -> int:
        """Read the checkpoint in a round trip of its own (0 when the view has none)."""
        if self._read is not None:
            self.position = await self._read()
        return self.position


async def read_single_view(
    client: aioredis.Redis,
    key: str,
    parse: Callable[[bytes], T],
    at: QueryCheckpoint,
    cache: NearCache | None,
) -> T | None:
    """The view stored at `key`, parsed (None when absent), setting `at.position` (see read_view_field)."""
    field = await read_view_field(ViewReader(client), client, key, at, cache)
    return None if field is None else parse(view_bytes(field))


def _view_field_of(raw: Any) -> bytes | None:
    return None if raw is None else view_field(raw if isinstance(raw, bytes) else str(raw).encode())


async def read_view_field(
    reader: ViewReader, client: aioredis.Redis, key: str, at: QueryCheckpoint, cache: NearCache | None
) -> bytes | None:
    """The view stored at `key` as field 1 of a reply (None when absent), setting `at.position`.

    A near-cache hit at the projector's checkpoint makes no Redis call; otherwise the checkpoint
    is read with the view in one script call (`reader`, see QueryCheckpoint), or, when it
    cannot be, in a round trip of its own just before. The cache keeps the field bytes, so a hit is
    written to the caller as it is (read_service.entrypoints.replies).
    """
    if cache is not None:
        hit = at.from_memory(cache, key)
        if hit is not None:
            cached: bytes | None = hit[0]
            return cached

    async def read() -> bytes | None:
        return _view_field_of(await client.get(key))

    pipelined = at.pipelined()
    if pipelined is None:
        await at.read()
        return await read() if cache is None else await cache.get((key,), read)
    checkpoint_key, known = pipelined

    async def load() -> tuple[bytes | None, int]:
        read = await reader.read(checkpoint_key, key)
        return _view_field_of(read.view), await at.settle(read.checkpoint, known)

    value, _ = await load() if cache is None else await cache.fill((key,), load)
    return value
