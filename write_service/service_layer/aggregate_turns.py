"""Commands on the same aggregate take turns within one process.

A unit of work guards its write by the version it read instead of locking the row
(decision 0027). Without turns, concurrent commands on one hot aggregate would read the
same version, and all but one would fail their guard and retry; with them, each reads the
version the previous one wrote. Across processes the guard still decides and the loser
retries. A keyed command takes its key's lock before its turn, so a retry of a running
keyed command is refused at once rather than queued.

While commands queue on an aggregate, the turn keeps the state the last of them committed,
so the next one need not read it again: its write is guarded by that version anyway, and
a rule that refuses it on that state is checked again on a fresh read (`change_aggregate`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from shared_kernel import errors
from write_service.commands.base import ChangeCommand
from write_service.domain.aggregate import Aggregate
from write_service.service_layer.deadline import Deadline


@dataclass(slots=True)
class Turn:
    """One aggregate's turn: its lock, how many commands hold or await it, and its last committed state."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0
    # A private copy of the aggregate as the last command here committed it; None when unknown.
    state: Aggregate | None = None


class AggregateTurns:
    """One attempt at a time per aggregate in this process, first come first served."""

    def __init__(self) -> None:
        self._turns: dict[tuple[str, str], Turn] = {}

    def __len__(self) -> int:
        return len(self._turns)

    @asynccontextmanager
    async def turn(self, command: ChangeCommand, deadline: Deadline) -> AsyncIterator[Turn]:
        """Wait (within the command's deadline) until no other command on the same aggregate runs here."""
        key = (command.aggregate_type, command.aggregate_id)
        turn = self._turns.setdefault(key, Turn())
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
                yield turn
            finally:
                turn.lock.release()
        finally:
            turn.users -= 1
            if turn.users == 0:
                del self._turns[key]
