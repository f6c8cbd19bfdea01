"""The python engine: several client processes driven through one measuring window, their records merged.

Each client process (`perf.loadtest.worker`) gets its plan, connects, and reports ready;
the window opens at a common wall-clock time shortly after the last one is ready. While the
run lasts, a progress line goes to stderr once per second (calls/s, errors, p99 so far).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from perf.loadtest.stats import Histogram, Second, Timeline
from perf.loadtest.worker import CONNECT_TIMEOUT_S, Plan

# Most time a client process may take to start, load its seed and connect.
READY_TIMEOUT_S = 60.0 + CONNECT_TIMEOUT_S
# The window opens this long after the last client process is ready.
START_DELAY_S = 0.3


class EngineError(RuntimeError):
    """A client process failed; the message says which and why."""


@dataclass
class RunResult:
    """What a run measured, merged over its client processes."""

    timeline: Timeline = field(default_factory=Timeline)
    elapsed_s: float = 0.0
    first_errors: dict[str, str] = field(default_factory=dict)
    connected: int = 0
    channels: int = 0
    retries: int = 0  # commands the client library sent again under their idempotency key

    @property
    def total(self) -> Second:
        """Every call of the run."""
        return self.timeline.total()


class Progress:
    """The live line: once per second, calls/s over the last second, errors so far and the p99 so far."""

    def __init__(self, out: TextIO | None) -> None:
        """`out` None keeps quiet."""
        self.out = out
        self.started = time.monotonic()
        self.latencies = Histogram()
        self.completed = 0
        self.errors = 0
        self.last_completed = 0
        self.last_time = self.started

    def add(self, second: Second) -> None:
        """Count one second record of one process."""
        self.latencies.merge(second.latencies)
        self.completed += second.completed
        self.errors += sum(second.errors.values())

    def show(self) -> None:
        """Print the line."""
        if self.out is None:
            return
        now = time.monotonic()
        rate = (self.completed - self.last_completed) / max(1e-6, now - self.last_time)
        self.last_completed, self.last_time = self.completed, now
        self.out.write(
            f"[{now - self.started:5.0f} s] {rate:9.0f} calls/s   {self.completed:9d} done   "
            f"errors {self.errors:6d}   p99 so far {self.latencies.percentile(99.0):8.2f} ms\n"
        )
        self.out.flush()


async def run_processes(
    plans: list[Plan],
    progress_out: TextIO | None = sys.stderr,
    window_opens: Callable[[float], None] | None = None,
) -> RunResult:
    """Run one client process per plan through a common window; the merged result.

    `window_opens` is told the wall-clock time (time.time()) the measuring window opens at.
    """
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "perf.loadtest.worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=64 * 1024 * 1024,
        )
        for _ in plans
    ]
    result = RunResult()
    progress = Progress(progress_out)
    try:
        for process, plan in zip(processes, plans, strict=True):
            assert process.stdin is not None
            process.stdin.write((plan.to_json() + "\n").encode())
            await process.stdin.drain()
        for index, process in enumerate(processes):
            ready = await _next_record(process, READY_TIMEOUT_S, index)
            if ready.get("type") != "ready":
                raise EngineError(f"client process {index} sent {ready!r} instead of ready")
            result.connected += int(str(ready["connected"]))
            result.channels += int(str(ready["channels"]))
        start_at = time.time() + START_DELAY_S
        if window_opens is not None:
            window_opens(start_at)
        for process in processes:
            assert process.stdin is not None
            process.stdin.write(f"{start_at!r}\n".encode())
            await process.stdin.drain()
        progress.started = time.monotonic() + START_DELAY_S
        window = plans[0].duration_s + plans[0].timeout_s + 30.0
        ticker = asyncio.create_task(_tick(progress))
        try:
            await asyncio.gather(
                *(_collect(process, index, result, progress, window) for index, process in enumerate(processes))
            )
        finally:
            ticker.cancel()
        for index, process in enumerate(processes):
            code = await asyncio.wait_for(process.wait(), 30.0)
            if code != 0:
                raise EngineError(f"client process {index} exited with code {code}")
    finally:
        for process in processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
    return result


async def _tick(progress: Progress) -> None:
    # A quarter second after each second ends, once the client processes have sent it.
    await asyncio.sleep(max(0.0, progress.started + 1.25 - time.monotonic()))
    while True:
        progress.show()
        await asyncio.sleep(1.0)


async def _next_record(process: asyncio.subprocess.Process, timeout_s: float, index: int) -> dict[str, object]:
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), timeout_s)
    except TimeoutError:
        raise EngineError(f"client process {index} said nothing for {timeout_s:g} s") from None
    if not line:
        code = await process.wait()
        raise EngineError(f"client process {index} exited with code {code} (its error is above)")
    record = json.loads(line)
    assert isinstance(record, dict)
    return record


async def _collect(
    process: asyncio.subprocess.Process, index: int, result: RunResult, progress: Progress, window_s: float
) -> None:
    deadline = time.monotonic() + window_s
    while True:
        record = await _next_record(process, max(1.0, deadline - time.monotonic()), index)
        if record["type"] == "second":
            latencies = record["latencies"]
            errors = record["errors"]
            assert isinstance(latencies, dict) and isinstance(errors, dict)
            second = Second(Histogram.from_json(latencies), {str(k): int(v) for k, v in errors.items()})
            result.timeline.add(int(str(record["index"])), second)
            progress.add(second)
        elif record["type"] == "done":
            result.elapsed_s = max(result.elapsed_s, float(str(record["elapsed_s"])))
            result.retries += int(str(record.get("retries", 0)))
            first = record.get("first_errors", {})
            assert isinstance(first, dict)
            for code, details in first.items():
                result.first_errors.setdefault(str(code), str(details))
            return
