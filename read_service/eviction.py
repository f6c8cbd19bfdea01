"""Refuse a Redis that may evict views: its `maxmemory-policy` must keep keys without a TTL.

A Redis that evicts keys when it reaches `maxmemory` drops views, indexes and checkpoints
without telling anyone: queries would then answer NOT_FOUND or short pages as fact. Views,
indexes and checkpoints never carry a TTL, so two families of policies are safe:

- `noeviction`: a full Redis refuses writes; the projector fails loudly and retries.
- `volatile-*` (`volatile-lru`, `volatile-lfu`, `volatile-random`, `volatile-ttl`): only keys
  with a TTL are candidates. Ours are the applying leases, whose loss costs a takeover, never
  a view; with no candidate left Redis refuses writes, as with `noeviction`.

Every other policy (`allkeys-lru`, `allkeys-lfu`, `allkeys-random`, and any name this code
does not know) may evict views. The replica refuses to start against one (`check`), and
`EvictionGuard.run` asks again every `interval_s` while it serves, so a policy changed at
run time turns the replica NOT_SERVING until it is changed back. A managed Redis that
disables CONFIG (or renames it) cannot be asked: that is logged once as a warning and the
replica carries on, since refusing would make it unusable there; its operator has to make
sure of the policy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

logger = logging.getLogger(__name__)

SETTING = "maxmemory-policy"
SAFE_POLICIES = frozenset({"noeviction", "volatile-lru", "volatile-lfu", "volatile-random", "volatile-ttl"})
# How often a serving replica asks again (a CONFIG GET is a few microseconds of Redis time).
DEFAULT_INTERVAL_S = 5.0


class EvictingRedis(RuntimeError):
    """The views' Redis may evict keys without a TTL; the message names the setting and the fix."""

    def __init__(self, policy: str) -> None:
        super().__init__(
            f"Redis has {SETTING} {policy!r}, which may evict views, indexes and checkpoints and make "
            f"queries answer wrong results; set it to 'noeviction' (or a volatile-* policy), e.g. "
            f"`CONFIG SET {SETTING} noeviction` and the same in redis.conf"
        )
        self.policy = policy


async def eviction_policy(client: aioredis.Redis, timeout_s: float) -> str | None:
    """The server's `maxmemory-policy`, or None when the server does not let us ask (CONFIG disabled)."""
    try:
        async with asyncio.timeout(timeout_s):
            reply: dict[Any, Any] = await client.config_get(SETTING)
    except redis.exceptions.ResponseError:
        # Managed services answer "unknown command" (or a permission error) for CONFIG.
        return None
    value = reply.get(SETTING, reply.get(SETTING.encode()))
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def is_safe(policy: str) -> bool:
    """Whether `policy` never evicts a key without a TTL."""
    return policy.lower() in SAFE_POLICIES


class EvictionGuard:
    """Checks the views' Redis policy at start and while serving; see the module docstring."""

    def __init__(
        self,
        client: aioredis.Redis,
        timeout_s: float,
        interval_s: float = DEFAULT_INTERVAL_S,
        on_change: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self._client = client
        self._timeout_s = timeout_s
        self._interval_s = interval_s
        # Told each change of `safe`; may be set after construction (the replica's readiness).
        self.on_change = on_change
        self._safe = True
        self._warned_unknown = False

    @property
    def safe(self) -> bool:
        """False while the last answer named a policy that may evict views."""
        return self._safe

    async def check(self) -> None:
        """Raise EvictingRedis when the policy may evict views (the replica must not start).

        A Redis that cannot be reached now is left to `run` (the replica starts without Redis too,
        and serves only once its projectors have caught up).
        """
        try:
            policy = await self._policy()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError, TimeoutError) as exc:
            logger.info("could not read Redis %s at start (%s); checking again while running", SETTING, exc)
            return
        if policy is not None and not is_safe(policy):
            raise EvictingRedis(policy)

    async def run(self) -> None:
        """Ask every `interval_s` until cancelled; report each change of safety to `on_change`."""
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                policy = await self._policy()
            except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
                # Redis down: the projector notices and stops serving; nothing to add here.
                logger.debug("could not read %s: %s", SETTING, exc)
                continue
            safe = policy is None or is_safe(policy)
            if safe == self._safe:
                continue
            self._safe = safe
            if safe:
                logger.warning("Redis %s is %r again: views are no longer at risk", SETTING, policy)
            else:
                logger.error("%s; the replica stops serving until it is changed back", EvictingRedis(str(policy)))
            if self.on_change is not None:
                await self.on_change(safe)

    async def _policy(self) -> str | None:
        policy = await eviction_policy(self._client, self._timeout_s)
        if policy is None and not self._warned_unknown:
            self._warned_unknown = True
            logger.warning(
                "cannot read Redis %s (CONFIG is disabled, as on many managed services): make sure it is "
                "'noeviction' or a volatile-* policy, or views may be evicted silently",
                SETTING,
            )
        return policy
