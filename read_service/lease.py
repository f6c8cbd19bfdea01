"""The applying lease: which one of the replicas sharing a Redis applies a projection's events.

Every replica (and every worker of one) that keeps its views in the same Redis key space
serves queries from them, but only one applies events at a time: the holder of a lease,
a Redis string under the deployment's prefix,

    P meta:<name>:applier:v<version>   string  "<replica id>/<pid>#<random>", with a TTL

taken with SET NX PX, renewed by a compare-and-extend script every renew interval and
removed by compare-and-delete on a clean shutdown. When the holder dies, the key expires
after at most one TTL and the next replica that tries takes it: a takeover needs at most
TTL + renew interval, plus the new holder's catch-up from the event log.

The lease is one per projection *version*: during a rolling deploy the holder of the new
version builds the new generation while the holder of the old one keeps the served views
current (see read_service.generations).

Correctness never depends on the lease. The apply script writes an event only at checkpoint
+ 1, so two replicas that both believe they hold it for a moment (a paused holder whose lease
expired, a clock that runs slow) still apply every event once and in order; the loser's
attempts come back as duplicates, which the projector counts. The lease only spares the
followers the work.

A holder announces each checkpoint it reaches on `applied_channel(checkpoint_key)`, after the
views of that checkpoint are written. Followers listen there, so that consistency-token waits
and `changed()` wake-ups on a follower are driven by the holder's progress, not by polling; a
read of the checkpoint every renew interval covers announcements that pub/sub lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
import redis.exceptions

logger = logging.getLogger(__name__)

# Extend the lease only if we still hold it: ARGV[1] our token, ARGV[2] the TTL in ms.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# Give the lease up only if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_TRANSIENT = (redis.exceptions.RedisError, OSError, TimeoutError)


class ApplyMode(enum.StrEnum):
    """Who applies events to a key space several replicas may share."""

    LEASE = "lease"  # one lease holder applies; the others serve and follow its checkpoint
    ALWAYS = "always"  # every replica applies (the checkpoint script skips what another applied)


class LeaseLost(Exception):
    """This replica no longer holds the applying lease: it must stop applying."""


def lease_key(base: str, name: str, version: int) -> str:
    """The lease key of one version of one projection under the deployment's prefix `base`."""
    return f"{base}meta:{name}:applier:v{version}"


def applied_channel(checkpoint_key: str) -> str:
    """The channel a holder announces the checkpoints of `checkpoint_key` on."""
    return f"{checkpoint_key}:applied"


def default_holder_id(replica_id: str) -> str:
    """A holder id naming the process, as the x-tessera-replica header does."""
    return f"{replica_id}/{os.getpid()}"


@dataclass(frozen=True, slots=True)
class LeaseOptions:
    """How a projector takes part in the applying lease."""

    holder_id: str
    ttl_ms: int = 2000
    renew_interval_ms: int = 500

    def __post_init__(self) -> None:
        if self.ttl_ms < 100:
            raise ValueError("the lease TTL must be at least 100 ms")
        if not 0 < self.renew_interval_ms * 2 <= self.ttl_ms:
            raise ValueError("the renew interval must be positive and at most half the TTL")


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value


class ApplyingLease:
    """One process's side of a lease: take it, keep it, announce progress, give it up.

    `held` is local knowledge: true until the TTL of the last successful take or renewal,
    measured from *before* that request was sent, minus a margin, runs out. Redis expires the
    key no earlier than that, so a holder stops believing it holds the lease before another
    replica can take it (up to clock-rate differences, which the apply script's fencing covers).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        key: str,
        options: LeaseOptions,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self.key = key
        self.options = options
        self.token = f"{options.holder_id}#{secrets.token_hex(6)}"
        self._clock = clock
        self._ttl_s = options.ttl_ms / 1000
        self._renew_s = options.renew_interval_ms / 1000
        # A tenth of the TTL: the request's own round trip and some clock-rate difference.
        self._margin_s = self._ttl_s / 10
        self._valid_until = 0.0
        self._holder: str | None = None
        self._expires_in_s = 0.0
        self._changed = asyncio.Event()
        self._announce: dict[str, int] = {}
        self._announce_wake = asyncio.Event()
        self.takeovers = 0

    # -- observation

    @property
    def held(self) -> bool:
        """Whether this process may apply now (see the class docstring)."""
        return self._clock() < self._valid_until

    @property
    def holder(self) -> str | None:
        """The holder's id as last seen in Redis (this process's own when it holds the lease)."""
        if self.held:
            return self.options.holder_id
        return None if self._holder is None else self._holder.rsplit("#", 1)[0]

    def changed(self) -> asyncio.Event:
        """An event set the next time this process takes or loses the lease (replaced each time)."""
        return self._changed

    def check(self) -> None:
        """Raise LeaseLost unless this process holds the lease (called before every write)."""
        if not self.held:
            raise LeaseLost(f"the applying lease {self.key} is no longer held by {self.options.holder_id}")

    # -- one step each

    async def try_acquire(self) -> bool:
        """Take the lease if it is free (or extend it if it is already ours); True if held afterwards."""
        if self.held:
            return await self.renew()
        started = self._clock()
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.set(self.key, self.token, nx=True, px=self.options.ttl_ms)
            pipe.get(self.key)
            pipe.pttl(self.key)
            _, holder_raw, pttl = await pipe.execute()
        holder = _text(holder_raw)
        self._holder = holder
        self._expires_in_s = max(int(pttl), 0) / 1000
        if holder == self.token:
            self._set_valid(started)
            self.takeovers += 1
            return True
        return False

    async def renew(self) -> bool:
        """Extend the lease if it is still ours; False (and not held) if it is not."""
        started = self._clock()
        extended = bool(await self._client.eval(_RENEW, 1, self.key, self.token, str(self.options.ttl_ms)))
        if extended:
            self._set_valid(started)
        else:
            self._drop("it expired or another replica took it")
        return extended

    async def release(self) -> None:
        """Give the lease up if it is still ours (a clean shutdown), so a follower takes over at once."""
        was_held = self.held
        self._drop(None)
        if was_held:
            await self._client.eval(_RELEASE, 1, self.key, self.token)
            logger.info("released the applying lease", extra={"lease": self.key, "holder": self.options.holder_id})

    def announce(self, checkpoint_key: str, checkpoint: int) -> None:
        """Publish (soon, coalesced with later calls) that `checkpoint_key` reached `checkpoint`."""
        self._announce[checkpoint_key] = checkpoint
        self._announce_wake.set()

    # -- the background loop

    async def run(self) -> None:
        """Keep the lease (holder) or try to take it when it expires (follower), and publish announcements."""
        publisher = asyncio.create_task(self._publish(), name=f"lease-announce:{self.key}")
        try:
            while True:
                try:
                    if self.held:
                        await self.renew()
                    elif await self.try_acquire():
                        logger.info(
                            "took the applying lease; this replica applies events now",
                            extra={"lease": self.key, "holder": self.options.holder_id},
                        )
                        self._signal()
                except asyncio.CancelledError:
                    raise
                except _TRANSIENT as exc:
                    # `held` runs out by itself if this goes on; the projector then stops applying.
                    logger.warning("applying lease: %s: %s", type(exc).__name__, exc, extra={"lease": self.key})
                except Exception:
                    # Keep trying: a dead keeper would leave this replica following forever.
                    logger.exception("applying lease: unexpected error", extra={"lease": self.key})
                await asyncio.sleep(self._next_step_s())
        finally:
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher

    def _next_step_s(self) -> float:
        if self.held:
            return self._renew_s
        # A follower tries again right after the holder's lease would expire, or every renew interval.
        return max(0.005, min(self._renew_s, self._expires_in_s + 0.005))

    async def _publish(self) -> None:
        while True:
            await self._announce_wake.wait()
            self._announce_wake.clear()
            pending, self._announce = self._announce, {}
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for key, checkpoint in pending.items():
                        pipe.publish(applied_channel(key), str(checkpoint))
                    await pipe.execute()
            except _TRANSIENT as exc:
                # Followers read the checkpoint every renew interval anyway.
                logger.debug("could not announce a checkpoint: %s", exc)

    # -- internals

    def _set_valid(self, started: float) -> None:
        self._valid_until = started + self._ttl_s - self._margin_s
        self._holder = self.token

    def _drop(self, reason: str | None) -> None:
        if self._valid_until and reason is not None:
            logger.warning(
                "lost the applying lease: %s; not applying any more",
                reason,
                extra={"lease": self.key, "holder": self.options.holder_id},
            )
        if self._holder == self.token:
            self._holder = None  # unknown until the next attempt to take it
        if self._valid_until:
            self._valid_until = 0.0
            self._signal()

    def _signal(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
