"""The relay's overlap of marking one batch with claiming the next: both finish, errors are not lost."""

from __future__ import annotations

import asyncio

import pytest

from relay.runner import _together


async def test_returns_the_second_result_after_both_finished() -> None:
    finished: list[str] = []

    async def mark() -> None:
        await asyncio.sleep(0)
        finished.append("mark")

    async def claim() -> int:
        finished.append("claim")
        return 7

    assert await _together(mark(), claim()) == 7
    assert sorted(finished) == ["claim", "mark"]


async def test_a_failing_claim_still_lets_the_mark_finish() -> None:
    marked = asyncio.Event()

    async def mark() -> None:
        await asyncio.sleep(0.01)
        marked.set()

    async def claim() -> int:
        raise LookupError("claim failed")

    with pytest.raises(LookupError):
        await _together(mark(), claim())
    assert marked.is_set()


async def test_the_first_error_wins_when_both_fail() -> None:
    async def mark() -> None:
        raise KeyError("mark failed")

    async def claim() -> int:
        raise LookupError("claim failed")

    with pytest.raises(KeyError):
        await _together(mark(), claim())


async def test_cancelling_cancels_both() -> None:
    started = asyncio.Event()
    cancelled: list[str] = []

    async def hang(name: str) -> None:
        try:
            started.set()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(name)
            raise

    async def hang_claim() -> int:
        await hang("claim")
        return 0

    task = asyncio.create_task(_together(hang("mark"), hang_claim()))
    async with asyncio.timeout(5):
        await started.wait()
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert sorted(cancelled) == ["claim", "mark"]
