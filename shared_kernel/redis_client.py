"""Redis client pieces shared by the relay and the read service."""

from __future__ import annotations

from collections.abc import Iterable

import redis.exceptions
from redis.asyncio.connection import Connection


class ClosedTransportAwareConnection(Connection):
    """A Redis connection that reports a write to a connection the server closed as a ConnectionError.

    Under uvloop (which the processes run on) writing to a transport the peer has reset
    raises RuntimeError ("unable to perform operation on <TCPTransport closed=True>; the
    handler is closed", uvloop#506) where the default loop raises ConnectionResetError, and
    redis-py passes it on unchanged: a Redis restart would look like a bug (the relay would
    crash, a query would answer INTERNAL). As a ConnectionError it is retried like any other
    outage, and beyond the retries callers get UNAVAILABLE.
    """

    async def send_packed_command(self, command: bytes | str | Iterable[bytes], check_health: bool = True) -> None:
        """Send `command`; a closed transport raises redis.exceptions.ConnectionError."""
        try:
            await super().send_packed_command(command, check_health)
        except RuntimeError as exc:
            if "handler is closed" not in str(exc):
                raise
            raise redis.exceptions.ConnectionError(f"the connection was closed: {exc}") from exc
