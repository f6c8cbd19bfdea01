"""The queries' single-view reads, sent to Redis together: one write and one connection for many calls.

A replica under load has many GetUser / GetProduct / GetOrder calls waiting for Redis at once.
Through the driver's pool each of them takes a connection, packs its command, writes it in a
system call of its own and reads its reply under a timer of its own; on the cold path that
was most of a call's cost beside the bare server. `ReadPipeline` queues the commands of the
calls that reach it while a write is under way and sends them as one write on one connection
(Redis answers in order), then hands each caller its reply: the round trip is shared, the
per-command work of the driver is gone.

What a caller sees does not change:

- an error reply (NOSCRIPT, a script error) is that caller's exception, as the driver raises it;
- a lost connection or a Redis that does not answer within the socket timeout fails every call
  of the batch with the driver's ConnectionError or TimeoutError (mapped to UNAVAILABLE like
  any Redis failure). A connection found closed when a batch is written is opened again and
  the unanswered commands are sent once more, as the driver's single retry does; reads only;
- a caller that gives up (its deadline, the server's query budget) gives up at once; its reply,
  when it comes, is dropped. A command whose caller gave up before it was written is not sent.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

# The connection errors after which a batch is sent once more on a new connection.
_RETRIED = (redis.exceptions.ConnectionError, ConnectionError)
_FAILED = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError, TimeoutError)


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def pack_evalsha(sha: str, keys: Sequence[str]) -> bytes:
    """EVALSHA `sha` with `keys` (no other arguments) in the Redis protocol."""
    parts = [b"*%d\r\n$7\r\nEVALSHA\r\n" % (3 + len(keys)), _bulk(sha.encode()), _bulk(b"%d" % len(keys))]
    parts.extend(_bulk(key.encode()) for key in keys)
    return b"".join(parts)


class ReadPipeline:
    """Sends queued read commands in batches on one connection of a client's pool; see the module docstring."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._pool = client.connection_pool
        self._queue: list[tuple[bytes, asyncio.Future[Any]]] = []
        self._worker: asyncio.Task[None] | None = None
        self._connection: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def execute(self, packed: bytes) -> Any:
        """Send one packed command with the others queued now; its reply (raises what the driver raises)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # A client reused on another event loop (tests): nothing of the old one can be used.
            self._loop, self._queue, self._worker, self._connection = loop, [], None, None
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((packed, future))
        if self._worker is None:
            self._worker = loop.create_task(self._run(), name="redis-read-pipeline")
        return await future

    async def _run(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._send(batch)
        except BaseException as exc:
            for _packed, future in self._queue:
                _fail(future, exc)
            self._queue = []
            raise
        finally:
            self._worker = None

    async def _send(self, batch: list[tuple[bytes, asyncio.Future[Any]]]) -> None:
        pending = [item for item in batch if not item[1].done()]
        retried = False
        while pending:
            answered = 0
            try:
                connection = self._connection
                if connection is None:
                    connection = self._connection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
                await connection.send_packed_command([b"".join(packed for packed, _ in pending)], check_health=False)
                timeout = connection.socket_timeout
                async with asyncio.timeout(timeout or None):
                    for _packed, future in pending:
                        try:
                            reply = await connection.read_response(timeout=math.inf)
                        except redis.exceptions.ResponseError as exc:
                            _fail(future, exc)
                        else:
                            if not future.done():
                                future.set_result(reply)
                        answered += 1
            except _FAILED as exc:
                await self._drop()
                pending = [item for item in pending[answered:] if not item[1].done()]
                if isinstance(exc, _RETRIED) and not retried:
                    retried = True
                    continue
                if isinstance(exc, TimeoutError) and not isinstance(exc, redis.exceptions.TimeoutError):
                    exc = redis.exceptions.TimeoutError("Timeout reading from Redis")
                for _packed, future in pending:
                    _fail(future, exc)
                return
            except BaseException:
                # Cancelled (the process is stopping) or a bug: what is on the wire is unknown.
                await self._drop()
                raise
            else:
                return

    async def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            await connection.disconnect(nowait=True)
        finally:
            await self._pool.release(connection)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if future.done():
        return
    if isinstance(exc, asyncio.CancelledError):
        future.cancel()
    else:
        future.set_exception(exc)


_PIPELINES: weakref.WeakKeyDictionary[Any, ReadPipeline] = weakref.WeakKeyDictionary()


def read_pipeline(client: aioredis.Redis) -> ReadPipeline:
    """The pipeline of `client`'s pool: every reader of one client shares it (and its batches)."""
    pool = client.connection_pool
    pipeline = _PIPELINES.get(pool)
    if pipeline is None:
        pipeline = _PIPELINES[pool] = ReadPipeline(client)
    return pipeline
