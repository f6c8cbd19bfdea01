"""Commands on the same aggregate take turns within one process.

A unit of work guards its write by the version it read instead of locking the row
(decision 0027). Without turns, concurrent commands on one hot aggregate would read the
same version, and all but one would fail their guard and retry; with them, each reads the
version the previous one wrote. Across processes the guard still decides and the loser
retries. A keyed command takes its key's lock before its turn, so a retry of a running
keyed command is refused at once rather than queued.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from shared_kernel import errors
from write_service.domain.commands import ChangeCommand
from write_service.service_layer.deadline import Deadline


@dataclass(slots=True)
class _Turn:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class AggregateTurns:
    """One attempt at a time per aggregate in this process, first come first served."""

    def __init__(self) -> None:
        self._turns: dict[tuple[str, str], _Turn] = {}

    def __len__(self) -> int:
        return len(self._turns)

    @asynccontextmanager
    async def turn(self, command: ChangeCommand, deadline: Deadline) -> AsyncIterator[None]:
        """Wait (within the command's deadline) until no other command on the same aggregate runs here."""
        key = (command.aggregate_type, command.aggregate_id)
        turn = self._turns.setdefault(key, _Turn())
        turn.users += 1
        try:
            try:
                async with asyncio.timeout(deadline.remaining()):
                    await turn.lock.acquire()
            except TimeoutError:
                raise errors.Unavailable(
                    "the command ran out of time waiting behind other commands on its aggregate"
                ) from None
            try:
                yield
            finally:
                turn.lock.release()
        finally:
            turn.users -= 1
            if turn.users == 0:
                del self._turns[key]
