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
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from read_service.projections.base import Op

logger = logging.getLogger(__name__)

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
        if self._sha is None:
            await self.load_script()
        sha = self._sha
        assert sha is not None
        async with self._client.pipeline(transaction=False) as pipe:
            for position, ops in events:
                pipe.evalsha(sha, 1, self._checkpoint_key, str(position), *encode_ops(ops))
            raw_results = await pipe.execute()
        return [_result(raw) for raw in raw_results]
