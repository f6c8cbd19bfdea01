"""Checkpointed writes to a Redis read model: the only code that writes views and checkpoints.

Every write goes through one Lua script (apply_event.lua), loaded once and called by
EVALSHA, that compares the event's position with the checkpoint, runs the event's ops and
advances the checkpoint in one atomic step. Reads of the prior state a projection needs
are taken together with the checkpoint in one MULTI/EXEC, so the state and the position
it belongs to always match.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions

from read_service.near_cache import NearCache, ObservedCheckpoint
from read_service.projections.base import Op
from read_service.views.wire import view_bytes, view_field

logger = logging.getLogger(__name__)

T = TypeVar("T")

_SCRIPT = resources.files("read_service").joinpath("apply_event.lua").read_text(encoding="utf-8")


class Outcome(enum.IntEnum):
    """What the apply script did with one event."""

    GAP = -1
    DUPLICATE = 0
    APPLIED = 1


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """The script's answer: its outcome and the checkpoint after the call."""

    outcome: Outcome
    checkpoint: int


# Moves the checkpoint over a run of consecutive events that change nothing else (events a
# projection ignores): one call for the run instead of one apply-script call per event,
# which is most of the work when a replica replays the log for a projection that ignores
# most of it. KEYS[1] is the checkpoint key, ARGV[1] and ARGV[2] the run's first and last
# positions. Returns the checkpoint before and after the call. Below the run's start (a
# gap) or at or past its end (all duplicates) nothing changes; otherwise the events after
# the checkpoint are applied, which for them means moving the checkpoint to the last one.
_ADVANCE_SCRIPT = """
local checkpoint = tonumber(redis.call('GET', KEYS[1]) or '0')
local first = tonumber(ARGV[1])
local last = tonumber(ARGV[2])
if first == nil or last == nil or first < 1 or last < first then
  return redis.error_reply('ERR positions must be positive integers, first <= last')
end
if checkpoint < first - 1 or checkpoint >= last then
  return {checkpoint, checkpoint}
end
redis.call('SET', KEYS[1], ARGV[2])
return {checkpoint, last}
"""

# Fewer consecutive no-op events than this are applied one by one.
_MIN_ADVANCE_RUN = 2


def encode_ops(ops: Sequence[Op]) -> list[str | bytes | int]:
    """Flatten ops into the script's ARGV layout: for each op, its length then its arguments."""
    argv: list[str | bytes | int] = []
    for op in ops:
        argv.append(len(op))
        argv.extend(op)
    return argv


def _result(raw: Any) -> ApplyResult:
    outcome, checkpoint = raw
    return ApplyResult(Outcome(int(outcome)), int(checkpoint))


class ViewStore:
    """Applies projection ops to Redis under one checkpoint key."""

    def __init__(self, client: aioredis.Redis, checkpoint_key: str) -> None:
        self._client = client
        self._checkpoint_key = checkpoint_key
        self._sha: str | None = None
        self._advance_sha: str | None = None

    @property
    def checkpoint_key(self) -> str:
        """The Redis key holding the position of the last event applied."""
        return self._checkpoint_key

    async def load_script(self) -> None:
        """Load the apply scripts into Redis's script cache (again after a Redis restart)."""
        self._sha = await self._client.script_load(_SCRIPT)
        self._advance_sha = await self._client.script_load(_ADVANCE_SCRIPT)

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

    async def apply(self, position: int, ops: Sequence[Op]) -> ApplyResult:
        """Apply one event's ops if `position` is the checkpoint + 1."""
        results = await self.apply_many([(position, ops)])
        return results[0]

    async def apply_many(self, events: Sequence[tuple[int, Sequence[Op]]]) -> list[ApplyResult]:
        """Apply several events in order, in one pipelined round trip; each is checked on its own."""
        if not events:
            return []
        try:
            return await self._apply_many(events)
        except redis.exceptions.NoScriptError:
            # Redis restarted (or SCRIPT FLUSH ran) since the script was loaded. Re-running
            # the whole batch is safe: events already applied come back as duplicates.
            logger.info("apply script missing from Redis's cache; loading it again")
            await self.load_script()
            return await self._apply_many(events)

    async def _apply_many(self, events: Sequence[tuple[int, Sequence[Op]]]) -> list[ApplyResult]:
        if self._sha is None or self._advance_sha is None:
            await self.load_script()
        sha, advance_sha = self._sha, self._advance_sha
        assert sha is not None and advance_sha is not None
        calls = _calls(events)
        async with self._client.pipeline(transaction=False) as pipe:
            for first, last, ops in calls:
                if first == last:
                    pipe.evalsha(sha, 1, self._checkpoint_key, str(first), *encode_ops(ops))
                else:
                    pipe.evalsha(advance_sha, 1, self._checkpoint_key, str(first), str(last))
            raw_results = await pipe.execute()
        results: list[ApplyResult] = []
        for (first, last, _), raw in zip(calls, raw_results, strict=True):
            if first == last:
                results.append(_result(raw))
            else:
                results.extend(_advance_results(first, last, int(raw[0])))
        return results


def _calls(events: Sequence[tuple[int, Sequence[Op]]]) -> list[tuple[int, int, Sequence[Op]]]:
    """The script calls for `events`: (position, position, ops) each, or (first, last, ()) for a no-op run."""
    calls: list[tuple[int, int, Sequence[Op]]] = []
    run: list[int] = []

    def flush() -> None:
        if len(run) >= _MIN_ADVANCE_RUN:
            calls.append((run[0], run[-1], ()))
        else:
            calls.extend((position, position, ()) for position in run)
        run.clear()

    for position, ops in events:
        if not ops and (not run or position == run[-1] + 1):
            run.append(position)
            continue
        flush()
        if ops:
            calls.append((position, position, ops))
        else:
            run.append(position)
    flush()
    return calls


def _advance_results(first: int, last: int, before: int) -> list[ApplyResult]:
    """Per-event results of a no-op run, as one apply-script call per event would have answered."""
    if before < first - 1:
        return [ApplyResult(Outcome.GAP, before)] * (last - first + 1)
    return [
        ApplyResult(Outcome.DUPLICATE, before) if position <= before else ApplyResult(Outcome.APPLIED, position)
        for position in range(first, last + 1)
    ]


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

    async def read(self, checkpoint_key: str, view_key: str, *hash_keys: str) -> ViewRead:
        """The checkpoint, the view and the hashes, read atomically."""
        keys = (checkpoint_key, view_key, *hash_keys)
        try:
            if self._sha is None:
                self._sha = await self._client.script_load(_READ_VIEW_SCRIPT)
            raw = await self._client.evalsha(self._sha, len(keys), *keys)
        except redis.exceptions.NoScriptError:
            # Redis restarted (or SCRIPT FLUSH ran) since the script was loaded.
            self._sha = await self._client.script_load(_READ_VIEW_SCRIPT)
            raw = await self._client.evalsha(self._sha, len(keys), *keys)
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
