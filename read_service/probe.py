"""The key space probe: is what this projector wrote still in Redis, still the one replicas serve?

Every probe interval (or at once when a query reports a lost checkpoint, see
read_service.published) one pipelined read takes the generation pointer and the checkpoint.
A pointer that disappeared or a checkpoint that went back means Redis lost its data (a flush, a
restart without persistence): KeySpaceLost, and the runner rebuilds before it serves again. A
pointer naming another generation means a rebuild switched it: KeySpaceChanged, and the runner
follows. The probe also tells the session when parked work may go on (read_service.parking).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from read_service.context import ProjectionContext
from read_service.event_source import Inbound, Kind
from read_service.log_guard import Fingerprint, fingerprint_key
from read_service.parking import Parking

if TYPE_CHECKING:
    from read_service.rewind import RewindGuard  # it raises this module's KeySpaceLost


class KeySpaceLost(Exception):
    """Redis no longer holds what this projector wrote (a flush, a restart without persistence)."""


class KeySpaceChanged(Exception):
    """The pointer names another generation than the one this projector writes."""


class Probe:
    """Checks one projection's key space; see the module docstring."""

    def __init__(self, ctx: ProjectionContext, parking: Parking, guard: RewindGuard) -> None:
        self._ctx = ctx
        self._parking = parking
        self._guard = guard

    async def check(self) -> bool:
        """Raise KeySpaceLost or KeySpaceChanged as the probe finds; True when parked work may go on."""
        ctx = self._ctx
        # What this projector knew before the read: it may apply more while the read is in flight,
        # and a checkpoint behind that later value is not one that went back.
        known = ctx.checkpoint
        async with ctx.client.pipeline(transaction=False) as pipe:
            pipe.get(ctx.meta.pointer)
            pipe.get(ctx.projection.checkpoint_key)
            pipe.get(fingerprint_key(ctx.projection.checkpoint_key))
            pointer_raw, checkpoint_raw, fingerprint_raw = await pipe.execute()
        pointer = None if pointer_raw is None else bytes(pointer_raw).decode()
        checkpoint = int(checkpoint_raw or 0)
        with_generations = ctx.links.generations is not None
        if with_generations and pointer is None:
            await ctx.set_ready(False)
            raise KeySpaceLost("the generation pointer is gone from Redis: its data was lost")
        if with_generations and pointer != ctx.generation:
            raise KeySpaceChanged(f"the pointer moved from generation {ctx.generation} to {pointer}")
        if checkpoint < known:
            await ctx.set_ready(False)
            raise KeySpaceLost(f"the checkpoint went back from {known} to {checkpoint}")
        await self._guard.check(Fingerprint.decode(fingerprint_raw))
        return await self._parking.may_resume(checkpoint)

    async def watch(self, inbox: asyncio.Queue[Inbound]) -> None:
        """Check every probe interval for the session: a failure or a due retry goes to its inbox."""
        ctx = self._ctx
        reported = ctx.published.loss_reported()
        while True:
            # A query that found the checkpoint gone back wakes the probe at once.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reported.wait(), ctx.options.probe_interval_s)
            reported.clear()
            try:
                # A holder that lost the lease while idle becomes a follower now, not at its next event.
                ctx.check_lease()
                retry = await self.check()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                inbox.put_nowait(Inbound(Kind.FAILED, error=exc))
                return
            if retry:
                inbox.put_nowait(Inbound(Kind.RETRY))
