"""Watch streams that survive the loss of the replica serving them.

Every message of a watch is exact at an event-log position (`view_position`), and positions
strictly increase along a stream. When the stream breaks (UNAVAILABLE, the replica killed or
draining, or a clean end at its shutdown) the client opens the same watch again on the read
channel, whose round_robin picks a live replica, with `after_position` set to the position of
the last message it delivered. The new replica replays from the event log every change after
that position, each as the view was at its event, then goes on live: the caller sees every
message exactly once, in order, with no gap and no duplicate, whichever replica sent it.

As a guard, a message at a position not above the last one delivered is dropped (a replica
that predates `after_position` answers a resume with the view now: the caller then sees the
latest state, but may miss the versions in between).

Reconnecting gives up, raising the last error, when no stream could be opened for
`reconnect_within_s` seconds in a row. Other errors end the watch at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from tessera_client import errors

RESUMABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}
)
_BACKOFF_FIRST_S = 0.05
_BACKOFF_MAX_S = 1.0


async def resuming_watch(
    open_stream: Callable[[int | None, list[tuple[str, str]]], Any],
    metadata: Callable[[], Awaitable[list[tuple[str, str]]]],
    *,
    after: int | None,
    reconnect_within_s: float,
    on_resume: Callable[[], None] = lambda: None,
) -> AsyncIterator[Any]:
    """Yield the watch's messages once each, reopening it after a lost replica where the last one left off.

    `open_stream(after_position, metadata)` opens the watch (None: from the view now);
    `after` is the caller's own resume point, if it gave one.
    """
    last_position = after
    failing_since: float | None = None
    backoff = _BACKOFF_FIRST_S
    while True:
        call = open_stream(last_position, await metadata())
        try:
            async for message in call:
                failing_since, backoff = None, _BACKOFF_FIRST_S
                position = int(message.view_position)
                if last_position is not None and position <= last_position:
                    continue  # already delivered before the resume
                last_position = position
                yield message
            # A clean end: the replica shut down its watches while draining. Resume elsewhere.
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in RESUMABLE:
                raise errors.error_from_rpc(exc, "watch") from None
            now = time.monotonic()
            failing_since = failing_since or now
            if now - failing_since > reconnect_within_s:
                raise errors.error_from_rpc(exc, "watch") from None
        finally:
            call.cancel()
        on_resume()
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, _BACKOFF_MAX_S)
