"""The replica's event source: one pub/sub subscription, fanned out to every projection.

The relay publishes each event once on the events channel and a StreamHead heartbeat on the
head channel. A replica used to subscribe once per projection, so each event was read from the
socket, parsed and decoded as many times as the replica has projections. The source reads and
decodes it once and hands the same envelope to every subscriber (a projector's session).

A subscriber gets its own inbox, and only once the subscription is confirmed live: whatever
is published after `subscribe()` returns reaches that inbox, so a projector that catches up
from the event log after subscribing misses nothing. The inbox is bounded by `buffer_limit`:
beyond it messages are dropped and one OVERFLOW marker tells the subscriber to catch up from
the log. A failed connection, or a silent one (no message and no PONG for three ping
intervals), ends every subscription with a FAILED item, and a re-subscription that redis-py
made on its own after a reconnect is announced as RESUBSCRIBED (messages may have been lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis
import redis.exceptions
from google.protobuf.message import DecodeError
from redis._parsers import hiredis as _hiredis_parser
from redis.asyncio.client import PubSub

from shared_kernel.contracts.event_log import events_channel, head_channel
from shared_kernel.platform.backoff import Backoff
from shared_kernel.platform.runtime import cancel_and_wait
from tessera.events.v1.envelope_pb2 import EventEnvelope, StreamHead

logger = logging.getLogger(__name__)

# What the hiredis reader answers when its buffer holds no complete reply.
_NOT_ENOUGH_DATA: object = getattr(_hiredis_parser, "NOT_ENOUGH_DATA", object())


def _buffer_reader(pubsub: PubSub) -> Callable[[], object] | None:
    """The hiredis reader's `gets` of the subscription's connection: the next buffered reply, without I/O.

    None when the connection does not parse with hiredis (the pure-Python parser keeps no
    such buffer of whole replies) or is not connected: messages then come one per get_message.
    """
    connection = pubsub.connection
    parser = getattr(connection, "_parser", None)
    if not isinstance(parser, _hiredis_parser._AsyncHiredisParser):
        return None
    reader = getattr(parser, "_reader", None)
    gets: Callable[[], object] | None = getattr(reader, "gets", None)
    return gets


class Kind(enum.Enum):
    """What an inbox item is."""

    EVENT = "event"
    HEAD = "head"
    RESUBSCRIBED = "resubscribed"
    OVERFLOW = "overflow"
    RETRY = "retry"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Inbound:
    """One item of a subscriber's inbox."""

    kind: Kind
    # EVENT: the decoded envelope, shared by every subscriber (read it, never change it);
    # None when the message did not decode (an event may hide behind it: catch up).
    envelope: EventEnvelope | None = None
    # HEAD: the position the relay announced.
    head: int = 0
    # FAILED: why the subscription ended.
    error: BaseException | None = None


@dataclass(eq=False)
class Subscriber:
    """A session's share of the stream: its inbox, and whether an overflow marker is in it."""

    inbox: asyncio.Queue[Inbound] = field(default_factory=asyncio.Queue)
    overflowed: bool = False


class EventSource:
    """One subscription to the relay's channels for the whole replica; see the module docstring."""

    def __init__(
        self,
        client: aioredis.Redis,
        channel_prefix: str,
        *,
        buffer_limit: int = 10_000,
        ping_interval_s: float = 5.0,
        subscribe_timeout_s: float = 5.0,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
    ) -> None:
        self._client = client
        self._events_channel = events_channel(channel_prefix)
        self._events_channel_bytes = self._events_channel.encode()
        self._head_channel = head_channel(channel_prefix)
        self._buffer_limit = buffer_limit
        self._ping_interval_s = ping_interval_s
        self._subscribe_timeout_s = subscribe_timeout_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._subscribers: set[Subscriber] = set()
        self._live = asyncio.Event()
        self._ended = asyncio.Event()
        self._failure: BaseException | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def events_channel(self) -> str:
        """The channel the events arrive on (spans name it)."""
        return self._events_channel

    def start(self) -> None:
        """Subscribe now (in a task of the running loop), before any projector asks; a no-op once running.

        A replica keeps its subscription while its projections only follow the lease holder:
        taking the lease over then finds it live, and Redis sees one subscriber per replica.
        """
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="event-source")

    async def subscribe(self) -> Subscriber:
        """A new inbox that receives everything published from now on; ConnectionError if not live in time."""
        self.start()
        if not self._live.is_set():
            live = asyncio.ensure_future(self._live.wait())
            ended = asyncio.ensure_future(self._ended.wait())
            try:
                await asyncio.wait(
                    {live, ended}, timeout=self._subscribe_timeout_s, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                live.cancel()
                ended.cancel()
            if not self._live.is_set():
                failure = self._failure
                if failure is not None:
                    raise failure
                raise redis.exceptions.ConnectionError("pub/sub subscription was not confirmed in time")
        subscriber = Subscriber()
        self._subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Stop delivering to `subscriber` (a no-op when it is gone already)."""
        self._subscribers.discard(subscriber)

    async def close(self) -> None:
        """Stop reading; safe to call more than once."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            await cancel_and_wait([task], wait_s=0.5, attempts=20)

    async def _run(self) -> None:
        """Keep the subscription up, reconnecting with capped, jittered backoff after a failure."""
        backoff = Backoff(self._backoff_initial_s, self._backoff_max_s)
        while True:
            self._ended.clear()
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self._events_channel, self._head_channel)
                await self._read(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._live.is_set():
                    # The subscription worked for a while: this is a new outage, not the same one.
                    backoff.reset()
                self._end(exc)
                logger.warning("event subscription ended: %s: %s; resubscribing", type(exc).__name__, exc)
            finally:
                self._live.clear()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.aclose(), self._subscribe_timeout_s)
            await asyncio.sleep(backoff.next_delay())

    def _end(self, exc: BaseException) -> None:
        """Tell every subscriber the subscription failed, and forget them: their sessions end."""
        self._failure = exc
        self._live.clear()
        self._ended.set()
        for subscriber in self._subscribers:
            subscriber.inbox.put_nowait(Inbound(Kind.FAILED, error=exc))
        self._subscribers.clear()

    async def _read(self, pubsub: PubSub) -> None:
        """Deliver messages until the connection fails (raises).

        After each message the driver returns, the messages already in its read buffer are
        taken straight from it (`_drain`): a burst then costs a parse per message, not a pass
        through the driver's whole read path per message.
        """
        confirmations = 0
        last_heard = time.monotonic()
        while True:
            message = await pubsub.get_message(timeout=self._ping_interval_s)
            now = time.monotonic()
            if message is None:
                # Idle: a half-open TCP connection would stay silent forever, so ask for a
                # PONG and give up on the connection when even that does not come back.
                if now - last_heard > 3 * self._ping_interval_s:
                    raise redis.exceptions.ConnectionError("pub/sub connection went silent")
                await pubsub.ping()
                continue
            last_heard = now
            while message is not None:
                kind = message["type"]
                if kind == "subscribe":
                    confirmations += 1
                    if confirmations == 2:
                        self._failure = None
                        self._live.set()
                    elif confirmations > 2:
                        # redis-py re-subscribed after a silent reconnect: messages may be lost.
                        self._broadcast(Inbound(Kind.RESUBSCRIBED))
                elif kind == "message":
                    self._deliver(message["channel"], message["data"])
                message = await self._drain(pubsub)

    async def _drain(self, pubsub: PubSub) -> dict[str, object] | None:
        """Deliver the messages the driver has buffered already; the first other reply as a message, else None."""
        reader = _buffer_reader(pubsub)
        if reader is None:
            return None
        events = self._events_channel_bytes
        while True:
            response = reader()
            if response is _NOT_ENOUGH_DATA:
                return None
            if isinstance(response, list) and len(response) == 3 and response[0] == b"message":
                channel = response[1]
                data = response[2]
                if channel == events:
                    self._deliver_event(data)
                else:
                    self._deliver(channel, data)
                continue
            if isinstance(response, BaseException):
                raise redis.exceptions.ConnectionError(f"pub/sub connection failed: {response}")
            # A subscription confirmation, a PONG: the driver's own bookkeeping handles it.
            message: dict[str, object] | None = await pubsub.handle_message(response)  # type: ignore[no-untyped-call]
            if message is not None:
                return message

    def _deliver(self, channel: bytes | str, data: bytes) -> None:
        if not self._subscribers:
            # Every projection follows the lease holder: nobody to decode it for.
            return
        name = channel.decode() if isinstance(channel, bytes) else channel
        if name == self._events_channel:
            self._deliver_event(data)
            return
        try:
            item = Inbound(Kind.HEAD, head=StreamHead.FromString(data).position)
        except DecodeError:
            logger.warning("undecodable message on the head channel; ignored")
            return
        self._broadcast(item)

    def _deliver_event(self, data: bytes) -> None:
        if not self._subscribers:
            return
        try:
            item = Inbound(Kind.EVENT, EventEnvelope.FromString(data))
        except DecodeError:
            logger.warning("undecodable message on the events channel")
            item = Inbound(Kind.EVENT)
        self._broadcast(item)

    def _broadcast(self, item: Inbound) -> None:
        for subscriber in self._subscribers:
            inbox = subscriber.inbox
            if inbox.qsize() < self._buffer_limit:
                inbox.put_nowait(item)
            elif not subscriber.overflowed:
                # Dropping is safe: the log has every event. One marker makes it catch up later.
                subscriber.overflowed = True
                inbox.put_nowait(Inbound(Kind.OVERFLOW))
                logger.warning("live buffer full; dropping messages until the next catch-up")
