"""The follower role: serve the lease holder's views, write nothing, until this replica holds the lease.

A projector whose applying lease another replica holds (read_service.lease) runs a Follower
instead of a session. Its checkpoint (and so readiness, consistency-token waits and
`changed()`) follows the holder's announcements on `<checkpoint key>:applied`; every renew
interval it also reads the checkpoint (announcements are at-most-once), checks the key space
as the holder's probe does, and picks up the holder's parked event so that queries report it.
It is ready once the shared checkpoint reaches the log head it saw when it began following, or
the holder is parked right after the checkpoint. `run()` returns when this replica may apply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.client import PubSub

from read_service.generations import ParkedEvent
from read_service.lease import ApplyingLease, applied_channel
from read_service.published import PublishedState
from shared_kernel.contracts.event_log import head_position

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FollowerHooks:
    """What the follower needs from its projector: its current key space and its state changes."""

    # The checkpoint key of the key space served now, and a read of that checkpoint from Redis.
    checkpoint_key: Callable[[], str]
    read_checkpoint: Callable[[], Awaitable[int]]
    # Serve the pointer's generation if this version can (False: nothing to serve yet).
    follow_keyspace: Callable[[], Awaitable[bool]]
    # Raise when the key space was lost or switched (as the holder's probe does).
    check_keyspace: Callable[[], Awaitable[Any]]
    # The parked record of the served generation, if any.
    holder_parked: Callable[[], Awaitable[ParkedEvent | None]]
    observe_checkpoint: Callable[[int], Awaitable[None]]
    set_ready: Callable[[bool], Awaitable[None]]
    # Called once the follower serves (the projector reports FOLLOWING, a working session).
    following: Callable[[], None]


class Follower:
    """Follows the applying lease holder of one projection; see the module docstring."""

    def __init__(
        self,
        name: str,
        lease: ApplyingLease,
        client: aioredis.Redis,
        pool: asyncpg.Pool[Any],
        published: PublishedState,
        *,
        hooks: FollowerHooks,
        probe_interval_s: float,
        ping_interval_s: float,
        transient_errors: tuple[type[BaseException], ...],
    ) -> None:
        self._name = name
        self._lease = lease
        self._client = client
        self._pool = pool
        self._published = published
        self._hooks = hooks
        self._probe_interval_s = probe_interval_s
        self._ping_interval_s = ping_interval_s
        self._transient = transient_errors
        self._followed: str | None = None

    async def run(self) -> None:
        """Serve the holder's views until this replica holds the lease (or nothing is servable yet)."""
        lease = self._lease
        hooks = self._hooks
        changed = lease.changed()
        if not await hooks.follow_keyspace():
            # Nothing of this version to serve yet: its lease holder claims or builds it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), self._probe_interval_s)
            return
        pubsub = self._client.pubsub()
        announced: asyncio.Queue[int] = asyncio.Queue()
        reader: asyncio.Task[None] | None = None
        interval = lease.options.renew_interval_ms / 1000
        try:
            await pubsub.subscribe(applied_channel(hooks.checkpoint_key()))
            reader = asyncio.create_task(self._read_announcements(pubsub, announced))
            # Ready once the holder has applied the log as far as it reaches now.
            target = await head_position(self._pool)
            while not lease.held:
                changed = lease.changed()
                await hooks.check_keyspace()
                await hooks.observe_checkpoint(await hooks.read_checkpoint())
                parked = await hooks.holder_parked()
                published = self._published
                published.publish_parked(
                    parked if parked is not None and parked.position == published.checkpoint + 1 else None
                )
                self._log_holder()
                if not published.ready and (published.checkpoint >= target or published.parked is not None):
                    await hooks.set_ready(True)
                hooks.following()
                await self._follow_announcements(announced, reader, changed, target, time.monotonic() + interval)
        finally:
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, *self._transient):
                    await reader
            with contextlib.suppress(*self._transient):
                await pubsub.aclose()
        # The holder's park was the holder's: as the holder now, the projector finds it again itself.
        self._published.publish_parked(None)
        self._followed = None
        logger.info(
            "this replica holds the applying lease now; catching up from checkpoint %s",
            self._published.checkpoint,
            extra={"projection": self._name, "holder": lease.options.holder_id},
        )

    async def _follow_announcements(
        self,
        announced: asyncio.Queue[int],
        reader: asyncio.Task[None],
        changed: asyncio.Event,
        target: int,
        deadline: float,
    ) -> None:
        """Until `deadline` or a change of the lease: observe each checkpoint the holder announces."""
        published = self._published
        while not changed.is_set() and (remaining := deadline - time.monotonic()) > 0:
            got = asyncio.ensure_future(announced.get())
            flipped = asyncio.ensure_future(changed.wait())
            try:
                await asyncio.wait({got, flipped, reader}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                got.cancel()
                flipped.cancel()
            if reader.done():
                reader.result()
                raise redis.exceptions.ConnectionError("the announcement subscription ended")
            if got.done() and not got.cancelled() and got.result() > published.checkpoint:
                await self._hooks.observe_checkpoint(got.result())
                if not published.ready and published.checkpoint >= target:
                    await self._hooks.set_ready(True)

    def _log_holder(self) -> None:
        holder = self._lease.holder
        if holder != self._followed:
            self._followed = holder
            logger.info(
                "following the applying lease holder %s",
                holder or "(none yet)",
                extra={"projection": self._name, "checkpoint": self._published.checkpoint, "holder": holder},
            )

    async def _read_announcements(self, pubsub: PubSub, announced: asyncio.Queue[int]) -> None:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=self._ping_interval_s)
            if message is not None and message["type"] == "message":
                with contextlib.suppress(ValueError):
                    announced.put_nowait(int(message["data"]))
