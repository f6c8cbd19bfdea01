"""Giving up views built from events the log no longer holds (decision 0034).

The session asks the guard at every catch-up, on every probe and whenever the stream
repeats positions; read_service.log_guard answers whether the log still holds the event
last fingerprinted beside the checkpoint. When it does not, the projection goes NOT_SERVING,
the generation pointer is removed (compare-and-delete), so that every replica sharing these
views builds a new generation from the log as it is now, and the session ends with
KeySpaceLost, as after a lost Redis.
"""

from __future__ import annotations

import logging

from read_service.context import ProjectionContext
from read_service.keyspace import KeySpace
from read_service.log_guard import Fingerprint, LogRewound, check_log
from read_service.probe import KeySpaceLost

logger = logging.getLogger(__name__)


class RewindGuard:
    """Checks one projection's views against the log; see the module docstring."""

    def __init__(self, ctx: ProjectionContext, keyspace: KeySpace) -> None:
        self._ctx = ctx
        self._keyspace = keyspace

    async def check(self, fingerprint: Fingerprint | None = None) -> int:
        """Return the log's head; raise KeySpaceLost, after giving the views up, when the log went back.

        Without `fingerprint`, the one stored beside the checkpoint is read first.
        """
        ctx = self._ctx
        if fingerprint is None:
            fingerprint = await ctx.store.fingerprint()
        try:
            return await check_log(ctx.pool, fingerprint)
        except LogRewound as exc:
            await self._give_up(exc)
            raise KeySpaceLost(str(exc)) from exc

    async def _give_up(self, rewound: LogRewound) -> None:
        ctx = self._ctx
        ctx.counters.log_rewinds += 1
        await ctx.set_ready(False)
        logger.error(
            "%s; not serving this projection until its views are rebuilt from the log",
            rewound,
            extra={
                "projection": ctx.name,
                "generation": ctx.generation,
                "checkpoint": ctx.checkpoint,
                "log_head": rewound.head,
                "position": rewound.fingerprint.position,
            },
        )
        await self._keyspace.forget()
