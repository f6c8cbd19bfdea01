"""The consistency gate asks the event log only when a wait lasts, and still refuses impossible tokens."""

from __future__ import annotations

import asyncio
import time

import pytest

from read_service.consistency import LOG_CHECK_AFTER_S, ConsistencyGate
from shared_kernel.contracts import errors
from shared_kernel.contracts.consistency import ConsistencyToken


class Views:
    """A projection's progress and one aggregate's view version, moved by the test."""

    def __init__(self) -> None:
        self.checkpoint = 0
        self.version = 0
        self._changed = asyncio.Event()

    def changed(self) -> asyncio.Event:
        return self._changed

    def apply(self, version: int) -> None:
        self.checkpoint += 1
        self.version = version
        self._changed.set()
        self._changed = asyncio.Event()

    async def current_version(self, _aggregate_id: str) -> int:
        return self.version


class Log:
    """The event log's highest version of the aggregate, counting how often it is asked."""

    def __init__(self, latest: int) -> None:
        self.latest = latest
        self.asked = 0

    async def version(self, _aggregate_type: str, _aggregate_id: str) -> int:
        self.asked += 1
        return self.latest


TOKEN = ConsistencyToken("user", "u-1", 2)


async def test_a_token_applied_quickly_never_reaches_the_log() -> None:
    views, log = Views(), Log(latest=2)
    gate = ConsistencyGate(views, views.current_version, log.version)
    waiting = asyncio.create_task(gate.wait(TOKEN, budget_s=5.0))
    await asyncio.sleep(0)  # the waiter reads version 0 and starts waiting
    views.apply(1)
    views.apply(2)
    assert await asyncio.wait_for(waiting, 1.0) is True
    assert log.asked == 0


async def test_a_wait_that_lasts_asks_the_log_once_then_once_more_at_the_end() -> None:
    views, log = Views(), Log(latest=2)
    gate = ConsistencyGate(views, views.current_version, log.version)
    started = time.monotonic()
    assert await gate.wait(TOKEN, budget_s=0.3) is False
    assert time.monotonic() - started >= 0.3
    assert log.asked == 2


async def test_a_version_the_log_does_not_hold_is_refused_soon_after_the_check_delay() -> None:
    views, log = Views(), Log(latest=1)
    gate = ConsistencyGate(views, views.current_version, log.version)
    started = time.monotonic()
    with pytest.raises(errors.FailedPrecondition, match="version 2 of user u-1, which does not exist"):
        await gate.wait(TOKEN, budget_s=5.0)
    elapsed = time.monotonic() - started
    assert LOG_CHECK_AFTER_S <= elapsed < 1.0
    assert log.asked == 1


async def test_a_view_already_current_answers_without_waiting() -> None:
    views, log = Views(), Log(latest=2)
    views.apply(2)
    gate = ConsistencyGate(views, views.current_version, log.version)
    assert await gate.wait(TOKEN, budget_s=0.0) is True
    assert log.asked == 0
