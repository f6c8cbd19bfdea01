"""Lag mode: time from a command's reply to its effect being visible on each replica.

Commands are sent on an open-model schedule (`--rate`) through the client library (one
idempotency key per command, retried under it). After each reply, every replica is
asked for the new aggregate with the reply's consistency token and `max_wait_ms`: the replica
answers as soon as its view reflects the token (it is woken by its projector, not polled), so
reply → fresh answer is the lag plus one query round trip. An answer marked stale, NOT_FOUND
or UNAVAILABLE is asked again until a deadline.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from devstack.loadtest.engine import Progress
from devstack.loadtest.probe import NotVisible, call_until_fresh, replica_client
from devstack.loadtest.requests import CommandSource, bearer_token, send_command
from devstack.loadtest.schedule import due_offsets
from devstack.loadtest.stats import Histogram, Second, Timeline
from tessera_client import TesseraClient, TesseraError

# The query that shows each command's effect, and how to read the new id from the reply.
LAG_COMMANDS = {"register_user": "get_user", "add_product": "get_product"}


@dataclass
class LagResult:
    """Per-replica lags, command latencies and the merged timeline."""

    per_replica: dict[str, Histogram] = field(default_factory=dict)
    commands: Histogram = field(default_factory=Histogram)
    timeline: Timeline = field(default_factory=Timeline)
    errors: dict[str, int] = field(default_factory=dict)
    first_errors: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def error(self, code: str, details: str) -> None:
        """Count one failure."""
        self.errors[code] = self.errors.get(code, 0) + 1
        self.first_errors.setdefault(code, details[:300])


def _new_id(command: str, reply: Any) -> str:
    return str(reply.user_id if command == "register_user" else reply.product_id)


async def measure_lag(  # noqa: PLR0915 - one schedule with its per-command closure
    write: str,
    reads: Sequence[str],
    *,
    command: str,
    rate: float,
    duration_s: float,
    metadata: Sequence[tuple[str, str]] = (),
    visible_within_s: float = 30.0,
    progress_out: TextIO | None = sys.stderr,
) -> LagResult:
    """Run the schedule and return the lags by replica (milliseconds)."""
    if command not in LAG_COMMANDS:
        raise ValueError(f"lag measures {' or '.join(LAG_COMMANDS)}, not {command!r}")
    kind = LAG_COMMANDS[command]
    source = CommandSource(command, 0)
    result = LagResult(per_replica={address: Histogram() for address in reads})
    progress = Progress(progress_out)
    # Commands on one client; each replica is queried through a client reading from it alone.
    writer = TesseraClient(write, None, token=bearer_token(metadata), timeout=30.0, session=False)
    replicas = {address: replica_client(address, metadata, write) for address in reads}
    start = time.perf_counter() + 0.2
    last_second = max(0, math.ceil(duration_s) - 1)

    async def one(due: float) -> None:
        try:
            reply: Any = await send_command(writer, source.next_command(), 30.0)
        except TesseraError as error:
            result.error(error.code.name, error.message)
            progress.add(Second(errors={error.code.name: 1}))
            return
        replied = time.perf_counter()
        result.commands.record((replied - due) * 1000.0)
        key, token = _new_id(command, reply), str(reply.consistency_token)
        seen = await asyncio.gather(
            *(call_until_fresh(client, kind, key, token, replied + visible_within_s) for client in replicas.values()),
            return_exceptions=True,
        )
        second = Second()
        for address, when in zip(replicas, seen, strict=True):
            if isinstance(when, float):
                lag_ms = (when - replied) * 1000.0
                result.per_replica[address].record(lag_ms)
                second.latencies.record(lag_ms)
            elif isinstance(when, NotVisible):
                second.errors["NOT_VISIBLE"] = second.errors.get("NOT_VISIBLE", 0) + 1
                result.error("NOT_VISIBLE", f"{address}: {when}")
            elif isinstance(when, TesseraError):
                second.errors[when.code.name] = second.errors.get(when.code.name, 0) + 1
                result.error(when.code.name, f"{address}: {when.message}")
            else:
                raise when
        # Commands answered after the schedule's end count in its last second.
        result.timeline.add(min(max(0, int(replied - start)), last_second), second)
        progress.add(second)

    async def ticker() -> None:
        while True:
            await asyncio.sleep(1.0)
            progress.show()

    tasks: set[asyncio.Task[None]] = set()
    ticking = asyncio.create_task(ticker())
    try:
        for _number, offset in due_offsets(rate, duration_s, 0, 1):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(start + offset))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=visible_within_s + 35.0)
        result.elapsed_s = max(duration_s, time.perf_counter() - start)
    finally:
        ticking.cancel()
        for task in tasks:
            task.cancel()
        await writer.close()
        for client in replicas.values():
            await client.close()
    return result
