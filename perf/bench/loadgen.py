"""Closed-loop bare AddProduct transactions from several client processes: the write bench's ceiling.

Each process runs `concurrency` tasks on an asyncpg pool of its own; each task runs one
transaction (`bare_asyncpg.add_product`) after another, each with a sku and an idempotency
key of its own. The processes connect first, then all start at one moment the parent picks,
and count what completes within the window. (The service side is driven by
`python -m perf loadtest write`.)
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import queue
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What one client process does."""

    dsn: str
    concurrency: int
    pool_size: int  # connections of this process's pool
    duration_s: float
    run: str
    index: int


@dataclass(slots=True)
class LoadResult:
    """What all processes completed within the window."""

    processes: int
    concurrency: int
    duration_s: float
    ok: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    first_error: str = ""

    @property
    def rps(self) -> float:
        """Successful commands per second."""
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of `values` (fraction in 0..1); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


async def _bare_sender(spec: WorkerSpec) -> tuple[Callable[[int], Awaitable[None]], Callable[[], Awaitable[None]]]:
    import asyncpg

    from perf.bench.bare_asyncpg import add_product
    from shared_kernel.platform.db import keep_session

    # Without the server-side reset on release, like the write service's pool.
    pool: Any = await asyncpg.create_pool(
        spec.dsn, min_size=spec.pool_size, max_size=spec.pool_size, reset=keep_session
    )

    async def send(i: int) -> None:
        sku = f"B-{spec.run}-{spec.index}-{i}"
        async with pool.acquire() as conn:
            await add_product(conn, sku, f"k-{sku}")

    return send, pool.close


async def _drive(spec: WorkerSpec, ready: Any, start: Any) -> dict[str, Any]:
    send, close = await _bare_sender(spec)
    counter = iter(range(10**12))
    latencies: list[float] = []
    errors = 0
    first_error = ""
    try:
        await send(next(counter))  # one warm-up command per process, outside the window
        ready.put(spec.index)
        start_at: float = await asyncio.to_thread(start.get, True, 120.0)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        end = time.perf_counter() + spec.duration_s

        async def loop() -> None:
            nonlocal errors, first_error
            while time.perf_counter() < end:
                began = time.perf_counter()
                try:
                    await send(next(counter))
                except Exception as exc:  # counted and reported; the load goes on
                    errors += 1
                    first_error = first_error or f"{type(exc).__name__}: {exc}"[:300]
                    continue
                done = time.perf_counter()
                if done <= end:
                    latencies.append((done - began) * 1000)

        await asyncio.gather(*(loop() for _ in range(spec.concurrency)))
    finally:
        await close()
    return {"ok": len(latencies), "errors": errors, "latencies_ms": latencies, "first_error": first_error}


def _worker(spec: WorkerSpec, ready: Any, start: Any, results: Any) -> None:
    """Entry point of a client process: drive, then put the figures (or the failure) on `results`."""
    try:
        results.put(asyncio.run(_drive(spec, ready, start)))
    except BaseException as exc:
        results.put({"fatal": f"{type(exc).__name__}: {exc}"[:500]})
        raise


def run_load(
    dsn: str,
    *,
    processes: int,
    concurrency: int,
    duration_s: float,
    pool_size: int = 10,
    startup_timeout_s: float = 60.0,
) -> LoadResult:
    """Drive `concurrency` transactions in flight, spread over `processes` client processes, for `duration_s`."""
    context = multiprocessing.get_context("spawn")
    ready: Any = context.Queue()
    results: Any = context.Queue()
    starts: list[Any] = [context.Queue() for _ in range(processes)]
    run = secrets.token_hex(3)
    per_process = [concurrency // processes + (1 if i < concurrency % processes else 0) for i in range(processes)]
    pools = [max(1, pool_size // processes + (1 if i < pool_size % processes else 0)) for i in range(processes)]
    workers = [
        context.Process(
            target=_worker,
            args=(
                WorkerSpec(dsn, max(1, per_process[i]), pools[i], duration_s, run, i),
                ready,
                starts[i],
                results,
            ),
            daemon=True,
        )
        for i in range(processes)
    ]
    result = LoadResult(processes=processes, concurrency=concurrency, duration_s=duration_s)
    try:
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + startup_timeout_s
        waiting = processes
        while waiting:
            try:
                ready.get(True, 0.2)
                waiting -= 1
            except queue.Empty:
                dead = [worker for worker in workers if worker.exitcode is not None]
                if dead or time.monotonic() > deadline:
                    fatal = _drain_fatal(results) or ("a client process exited" if dead else "timed out")
                    raise RuntimeError(f"the bare clients did not get ready: {fatal}") from None
        start_at = time.time() + 0.5
        for start in starts:
            start.put(start_at)
        collected = 0
        finish_by = time.monotonic() + duration_s + 60.0
        while collected < processes:
            figures = results.get(True, max(0.1, finish_by - time.monotonic()))
            collected += 1
            if "fatal" in figures:
                raise RuntimeError(f"a bare client failed: {figures['fatal']}")
            result.ok += figures["ok"]
            result.errors += figures["errors"]
            result.latencies_ms.extend(figures["latencies_ms"])
            result.first_error = result.first_error or figures["first_error"]
    finally:
        _stop(workers)
    return result


def _drain_fatal(results: Any) -> str:
    with contextlib.suppress(queue.Empty):
        figures = results.get(False)
        return str(figures.get("fatal", ""))
    return ""


def _stop(workers: Sequence[multiprocessing.process.BaseProcess]) -> None:
    for worker in workers:
        worker.join(timeout=5)
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)
