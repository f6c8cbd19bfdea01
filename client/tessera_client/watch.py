"""Watch streams that survive the loss of the replica serving them.

A replica's watch sends the view as it is, then every change, each exact at an event-log
position; it has no "resume from" field because any replica can rebuild the present. So the
client resumes by itself: when the stream breaks (UNAVAILABLE, the replica killed or
draining, or a clean end at its shutdown) it opens the same watch again on the read
channel, whose round_robin picks a live replica, and drops what it already delivered:

- a single-aggregate watch delivers only versions above the last one delivered (no
  duplicate), and the first message after a resume is that aggregate's state at the new
  replica, so the caller always ends up at the latest version (no lost state). Versions
  that were superseded while no replica served the stream are not replayed: a watch reports
  states, not events (the event log is the place for every step);
- a customer's orders watch keeps the last version delivered per order and drops orders of
  the resumed snapshot that are not newer.

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
    open_stream: Callable[[list[tuple[str, str]]], Any],
    metadata: Callable[[], Awaitable[list[tuple[str, str]]]],
    *,
    version_of: Callable[[Any], int] | None,
    reconnect_within_s: float,
    on_resume: Callable[[], None] = lambda: None,
) -> AsyncIterator[Any]:
    """Yield the watch's messages without a duplicate, reopening it after a lost replica.

    `version_of` gives a single-aggregate message's version; None means a customer's orders
    watch (messages with `orders` and `initial`).
    """
    last_version = -1
    order_versions: dict[str, int] = {}
    delivered_initial = False
    failing_since: float | None = None
    backoff = _BACKOFF_FIRST_S
    while True:
        call = open_stream(await metadata())
        try:
            async for message in call:
                failing_since, backoff = None, _BACKOFF_FIRST_S
                if version_of is not None:
                    version = version_of(message)
                    if version <= last_version:
                        continue  # already delivered before the resume
                    last_version = version
                    yield message
                    continue
                fresh = [o for o in message.orders if o.version > order_versions.get(o.order_id, 0)]
                if delivered_initial and not fresh:
                    continue
                for order in fresh:
                    order_versions[order.order_id] = order.version
                if delivered_initial and len(fresh) != len(message.orders):
                    del message.orders[:]
                    message.orders.extend(fresh)
                if delivered_initial:
                    message.initial = False
                delivered_initial = True
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
