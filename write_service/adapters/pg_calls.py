"""A unit of work's connection and deadline, shared by every Postgres repository of the write side."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

T = TypeVar("T")

if TYPE_CHECKING:
    # Generic only in the stubs; at run time the class cannot be subscripted.
    from asyncpg.pool import PoolConnectionProxy

    from write_service.service_layer.deadline import Deadline

    Connection = PoolConnectionProxy[Any]

_CLIENT_GRACE_S = 0.1


class Calls:
    """Runs one connection's calls within the command's deadline."""

    def __init__(self, conn: Connection, deadline: Deadline) -> None:
        self.conn = conn
        self.deadline = deadline

    async def run(self, call: Awaitable[T]) -> T:
        """Await `call`, cancelling it shortly after the deadline passes (TimeoutError)."""
        # The grace lets the server-side statement_timeout fire first: a clean error that
        # leaves the connection usable. This timeout is the backstop for a silent network.
        async with asyncio.timeout(self.deadline.remaining() + _CLIENT_GRACE_S):
            return await call
