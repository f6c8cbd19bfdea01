"""The process runner: uvloop, and the start-up heap kept out of the collector's full passes."""

from __future__ import annotations

import asyncio
import gc

import uvloop

from shared_kernel.platform.runtime import run


def test_the_main_coroutine_runs_on_uvloop_with_the_heap_so_far_frozen() -> None:
    gc.unfreeze()  # whatever an earlier test in this process froze

    async def main() -> int:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        return gc.get_freeze_count()

    try:
        frozen = run(main())
        # At least every module imported so far (a full collection no longer walks them).
        assert frozen > 10_000
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0
