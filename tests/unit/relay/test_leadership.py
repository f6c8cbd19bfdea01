"""LeaderSession.check: any failure of the lock session means leadership is lost, never a crash."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from relay.leadership import LeaderSession
from relay.outbox import LeadershipLost


class BrokenSession:
    """A lock connection whose queries fail with `error`, as a session ended by the server does."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def get_server_pid(self) -> int:
        return 4242

    def add_termination_listener(self, _callback: Any) -> None:
        pass

    def is_closed(self) -> bool:
        return False

    async def fetchval(self, *_args: Any, **_kwargs: Any) -> Any:
        raise self.error


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.InternalClientError("cannot switch to state 15; another operation (2) is in progress"),
        asyncpg.InterfaceError("connection is closed"),
        asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
        ConnectionResetError("reset"),
        TimeoutError(),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_a_failing_check_is_lost_leadership(error: BaseException) -> None:
    session = LeaderSession(BrokenSession(error), lock_key=1, timeout_s=1.0)  # type: ignore[arg-type]
    with pytest.raises(LeadershipLost, match=type(error).__name__):
        await session.check()
