"""The periodic task that deletes expired idempotency keys.

It runs inside every write-service process; several instances may run it at once, since
each purge skips rows another purger holds and rows whose key a running command holds.
A failed round is logged and retried at the next interval: the rows only wait longer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime

from write_service.service_layer.command_steps import utc_now
from write_service.service_layer.ports import ExpiredKeyPurger

logger = logging.getLogger(__name__)

# One round stops after this many batches, so a huge backlog cannot starve the loop's
# other duties (shutdown); the next round continues where it left off.
_MAX_BATCHES_PER_ROUND = 100


class ExpiredKeyCleanup:
    """Deletes expired idempotency keys every `interval_s` seconds, in batches."""

    def __init__(
        self,
        purger: ExpiredKeyPurger,
        *,
        interval_s: float,
        batch_size: int,
        clock: Callable[[], datetime] = utc_now,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._purger = purger
        self._interval_s = interval_s
        self._batch_size = batch_size
        self._clock = clock
        self._sleep = sleep

    async def run_once(self) -> int:
        """Delete what has expired by now, batch by batch; return how many rows went."""
        now = self._clock()
        total = 0
        for _ in range(_MAX_BATCHES_PER_ROUND):
            deleted = await self._purger.purge(now, self._batch_size)
            total += deleted
            if deleted < self._batch_size:
                break
        if total:
            logger.info("deleted expired idempotency keys", extra={"deleted": total})
        return total

    async def run(self) -> None:
        """Run a round now and then every interval, until cancelled."""
        while True:
            try:
                await self.run_once()
            except Exception:
                logger.warning("could not delete expired idempotency keys; retrying later", exc_info=True)
            await self._sleep(self._interval_s)
