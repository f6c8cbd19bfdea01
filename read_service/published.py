"""What a projection shows the rest of the replica: its checkpoint, readiness and what is parked.

The projector is the only writer (the `publish_*` methods); queries, the consistency gate,
watches and health read it. A query never calls into the projector: a query that finds the
checkpoint in Redis below the published one (Redis lost data) is refused with UNAVAILABLE and
*reports* the loss here, which wakes the projector's probe at once; the projector, not the
query, then stops serving and rebuilds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping

from read_service.generations import ParkedEvent
from read_service.view_store import CheckpointReader, ViewStore
from shared_kernel.contracts import errors

logger = logging.getLogger(__name__)


class PublishedState:
    """One projection's published state; see the module docstring."""

    def __init__(self, name: str, store: Callable[[], ViewStore]) -> None:
        self.name = name
        self._checkpoint = 0
        self._ready = False
        self._parked: ParkedEvent | None = None
        self._parked_aggregates: dict[str, ParkedEvent] = {}
        self._parked_sequences: dict[str, ParkedEvent] = {}
        self._changed = asyncio.Event()
        self._loss_reported = asyncio.Event()
        self.read_checkpoint = CheckpointReader(store, lambda: self._checkpoint, self._verify)

    # -- read side ------------------------------------------------------------------------------

    @property
    def checkpoint(self) -> int:
        """The position of the last event the views reflect, as the projector last saw it in Redis."""
        return self._checkpoint

    @property
    def ready(self) -> bool:
        """True while the views have caught up with the event log (and no loss was seen since)."""
        return self._ready

    @property
    def parked(self) -> ParkedEvent | None:
        """The event the projection is stopped at, if any (the views reflect the position before it)."""
        return self._parked

    @property
    def parked_aggregates(self) -> Mapping[str, ParkedEvent]:
        """The aggregates whose sequences are parked (aggregate parking), by aggregate id."""
        return self._parked_aggregates

    def parked_position(self, aggregate_id: str | None = None) -> int | None:
        """Where the views of `aggregate_id` stop: the projection's parked event, else the aggregate's."""
        parked = self._parked
        if parked is None and aggregate_id is not None and self._parked_aggregates:
            parked = self._parked_aggregates.get(aggregate_id)
        return None if parked is None else parked.position

    def changed(self) -> asyncio.Event:
        """An event set the next time the checkpoint moves (after the views of that move are written).

        Each move replaces it, so a reader takes it before looking at the views and waits on
        it: queries waiting for a consistency token are woken this way, not by polling.
        """
        return self._changed

    async def wait_for_checkpoint(self, position: int, timeout_s: float) -> bool:
        """Wait until the published checkpoint reaches `position`; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._checkpoint < position:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
        return True

    async def _verify(self, checkpoint: int, known: int) -> int:
        # `known` was taken before the read: the projector may move on while it is in flight.
        if checkpoint < known:
            if not self._loss_reported.is_set():
                logger.warning(
                    "a query found the checkpoint back at %s from %s: Redis lost data",
                    checkpoint,
                    known,
                    extra={"projection": self.name},
                )
            self._loss_reported.set()
            raise errors.Unavailable("the read model lost its data and is being rebuilt; retry shortly")
        return checkpoint

    # -- write side (the projector only) -----------------------------------------------------------

    def publish_checkpoint(self, checkpoint: int) -> None:
        """Move the checkpoint (the views of it are written) and wake whoever waits for a move."""
        if checkpoint == self._checkpoint:
            return
        self._checkpoint = checkpoint
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def publish_ready(self, ready: bool) -> None:
        """Say whether the views may be served."""
        self._ready = ready

    def publish_parked(self, parked: ParkedEvent | None) -> None:
        """Say which event the projection is stopped at (None: none)."""
        self._parked = parked

    def publish_parked_aggregates(self, records: Mapping[str, ParkedEvent]) -> None:
        """Say which sequences are parked now (by field, `<aggregate type>/<id>`)."""
        self._parked_sequences = dict(records)
        self._parked_aggregates = {field.partition("/")[2]: record for field, record in records.items()}

    @property
    def parked_sequences(self) -> Mapping[str, ParkedEvent]:
        """The parked sequences, by field (read_service.sequences)."""
        return self._parked_sequences

    def loss_reported(self) -> asyncio.Event:
        """Set when a query found the checkpoint gone back; the projector's probe clears it."""
        return self._loss_reported
