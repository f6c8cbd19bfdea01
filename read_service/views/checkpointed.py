"""A list query's first read and its checkpoint in one round trip.

A single-view query reads the checkpoint inside its read script (read_service.view_store,
ViewReader). A list query reads an index first, then the views it names, so it cannot be one
script whose keys are all declared up front (Redis Cluster). Its checkpoint read goes into
the same pipeline as its first command instead: Redis runs a connection's commands in order,
so the checkpoint is read before anything the query reads, and the answer reflects at least
that position, as when the checkpoint took a round trip of its own before the query.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from read_service.view_store import QueryCheckpoint


async def first_read(client: aioredis.Redis, at: QueryCheckpoint | None, queue: Callable[[Pipeline], Any]) -> list[Any]:
    """The replies to the commands `queue` adds to a pipeline, with `at`'s checkpoint read in the same round trip.

    `at` None reads no checkpoint. When `at` cannot be read in a pipeline (no checkpoint
    reader), it is read in a round trip of its own first, as before.
    """
    pipelined = None if at is None else at.pipelined()
    if at is not None and pipelined is None:
        await at.read()
    async with client.pipeline(transaction=False) as pipe:
        if pipelined is not None:
            pipe.get(pipelined[0])
        queue(pipe)
        replies: list[Any] = await pipe.execute()
    if pipelined is None or at is None:
        return replies
    await at.settle(replies[0], pipelined[1])
    return replies[1:]
