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

Commands that queue on one aggregate are written together (decision 0033): each waits in
the turn's queue, and whoever gets the turn next takes everything queued there, decides
each command in order on the state the previous one left, and writes all of their rows in
one statement. Each command still gets its own reply, and one that the rules refuse
leaves the state as it found it, so it does not affect the others.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context

from shared_kernel.contracts import errors
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
    # Commands waiting to be decided and written together by the next holder, in arrival order.
    queue: list[Queued] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class Queued:
    """A command waiting in its aggregate's turn; its outcome is set by whoever writes it."""

    command: ChangeCommand
    meta: Any  # CommandMeta (command_steps imports this module)
    change: Callable[[Any], Awaitable[None]]
    # Writes a batch through this command's unit of work (within its deadline).
    write: Callable[[Turn, list[Queued]], Awaitable[None]]
    # Written only in a batch of its own: its last attempt lost in a batch, and retries as before.
    alone: bool = False
    # The caller's trace context: its outbox rows carry it, whoever writes them.
    trace_context: otel_context.Context = field(default_factory=otel_context.get_current)
    outcome: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        """Set the outcome once; later calls do nothing."""
        if self.outcome.done():
            return
        if error is not None:
            self.outcome.set_exception(error)
        else:
            self.outcome.set_result(result)


# Commands queued on one aggregate written by one statement, at most.
MAX_BATCH = 64
# Commands told to retry alone that never came back are forgotten past this many.
_MAX_ALONE = 10_000


class AggregateTurns:
    """One attempt at a time per aggregate in this process, first come first served."""

    def __init__(self, max_batch: int = MAX_BATCH) -> None:
        self._turns: dict[tuple[str, str], Turn] = {}
        self._max_batch = max_batch
        self._alone: set[uuid.UUID] = set()
        # Lock ids of the idempotency keys of keyed commands queued or being written here.
        self._keys: set[int] = set()

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

    def claim_key(self, lock_id: int) -> bool:
        """Mark a key as running here; False when a command with that key already runs in this process."""
        if lock_id in self._keys:
            return False
        self._keys.add(lock_id)
        return True

    def release_key(self, lock_id: int) -> None:
        """The command with this key has its outcome."""
        self._keys.discard(lock_id)

    def retry_alone(self, command_id: uuid.UUID) -> None:
        """Have the next attempt of this command written in a batch of its own."""
        if len(self._alone) >= _MAX_ALONE:
            self._alone.clear()
        self._alone.add(command_id)

    def enqueue(
        self,
        command: ChangeCommand,
        meta: Any,
        change: Callable[[Any], Awaitable[None]],
        write: Callable[[Turn, list[Queued]], Awaitable[None]],
    ) -> Queued:
        """A queue entry for one attempt of `command` (alone if its last attempt was asked to retry alone)."""
        alone = meta.command_id in self._alone
        self._alone.discard(meta.command_id)
        return Queued(command=command, meta=meta, change=change, write=write, alone=alone)

    async def run_queued(self, entry: Queued, deadline: Deadline) -> Any:
        """Queue `entry` on its aggregate and return its outcome, set by whoever writes it next.

        Whoever gets the turn while its entry is still unwritten takes the queue (up to
        MAX_BATCH entries, never past one that must go alone) and writes it through the
        unit of work of the command with the most time left (the first to arrive usually
        has the least), which only the write opens; the write settles each entry. An entry
        that runs out of time while still queued leaves the queue with Unavailable; once
        taken, it waits for the write it is part of.
        """
        command = entry.command
        key = (command.aggregate_type, command.aggregate_id)
        turn = self._turns.setdefault(key, Turn())
        turn.users += 1
        turn.queue.append(entry)
        try:
            try:
                async with asyncio.timeout(deadline.remaining()):
                    await turn.lock.acquire()
            except TimeoutError:
                if entry in turn.queue:
                    turn.queue.remove(entry)
                    raise errors.Unavailable(
                        "the command ran out of time waiting behind other commands on its aggregate"
                    ) from None
                # Taken into a write that is under way: its outcome comes with that write.
                return await asyncio.shield(entry.outcome)
            except BaseException:
                if entry in turn.queue:
                    turn.queue.remove(entry)
                raise
            try:
                if not entry.outcome.done():
                    batch = self._take(turn, entry)
                    try:
                        # No queued command has its unit of work open: any of them can write the batch.
                        writer = max(batch, key=lambda queued: queued.meta.deadline.remaining())
                        await writer.write(turn, batch)
                    except BaseException as exc:
                        # What failed the write fails every command in it; a cancellation of
                        # the writer leaves the others' outcome unknown, as a lost connection would.
                        error = (
                            exc
                            if isinstance(exc, Exception)
                            else errors.Unavailable(
                                "the write of this command's batch was interrupted; its outcome is unknown"
                            )
                        )
                        for queued in batch:
                            queued.settle(error=error)
                        entry.outcome.exception()  # raised here; marked retrieved
                        raise
                    finally:
                        for queued in batch:
                            queued.settle(error=RuntimeError("a queued command was left without an outcome"))
            finally:
                turn.lock.release()
            return entry.outcome.result()
        finally:
            turn.users -= 1
            if turn.users == 0:
                del self._turns[key]

    def _take(self, turn: Turn, entry: Queued) -> list[Queued]:
        # Arrival order is the lock's order, so the holder's own entry is the first unwritten one.
        queue = turn.queue
        if queue[0].alone or queue[0] is not entry:
            batch = [entry]
        else:
            batch = [queue[0]]
            for queued in queue[1 : self._max_batch]:
                if queued.alone:
                    break
                batch.append(queued)
        for queued in batch:
            queue.remove(queued)
        return batch
