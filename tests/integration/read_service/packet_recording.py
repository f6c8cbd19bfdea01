"""A Redis connection class for tests that count what the client writes to the socket."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import redis.asyncio as aioredis


class RecordingConnection(aioredis.Connection):
    """A connection that keeps every packet it sends: one packet is one write, one round trip."""

    packets: ClassVar[list[bytes]] = []

    async def send_packed_command(self, command: bytes | str | Iterable[bytes], check_health: bool = True) -> None:
        if isinstance(command, str):
            packet = command.encode()
        elif isinstance(command, bytes):
            packet = command
        else:
            packet = b"".join(command)
        RecordingConnection.packets.append(packet)
        await super().send_packed_command(command, check_health)
