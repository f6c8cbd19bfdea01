"""The client process's load models: requests keep their due times when the client falls behind."""

from __future__ import annotations

import asyncio
import time

from perf.loadtest.worker import Plan, Recorder, _closed_model, _open_model


async def test_late_requests_keep_the_time_they_were_due() -> None:
    plan = Plan(mode="read", targets=["x:1"], process_index=0, processes=1, duration_s=0.5, rate=100.0)
    start = time.perf_counter() + 0.01
    due: dict[int, float] = {}
    sent: dict[int, float] = {}

    async def one(number: int, intended: float) -> None:
        due[number] = intended
        sent[number] = time.perf_counter()
        if number == 5:
            time.sleep(0.2)  # the client stalls: the next 20 requests go out late

    await _open_model(plan, start, one)
    assert sorted(due) == list(range(50))
    for number, when in due.items():
        assert abs(when - (start + number / 100.0)) < 1e-9
    # Requests due during the stall were sent late, yet their latency will count from `due`.
    assert sent[10] - due[10] > 0.1


async def test_the_recorder_counts_latency_from_the_due_time_and_errors_by_code() -> None:
    records: list[dict[str, object]] = []
    recorder = Recorder(start=100.0, duration_s=2.0, emit=records.append)
    recorder.record(intended=100.2, ended=100.5, code=None)
    recorder.record(intended=100.9, ended=101.1, code="UNAVAILABLE", details="connection refused")
    recorder.record(intended=101.9, ended=103.4, code=None)  # ended after the window: its last second
    recorder.flush()
    by_index = {record["index"]: record for record in records}
    assert set(by_index) == {0, 1}
    assert by_index[1]["errors"] == {"UNAVAILABLE": 1}
    latencies = by_index[0]["latencies"]
    assert isinstance(latencies, dict)
    assert abs(float(str(latencies["max_ms"])) - 300.0) < 1e-6
    assert recorder.first_errors == {"UNAVAILABLE": "connection refused"}


async def test_the_closed_model_runs_its_loops_until_the_end() -> None:
    plan = Plan(mode="read", targets=["x:1"], process_index=1, processes=2, duration_s=0.2, concurrency=3)
    numbers: list[int] = []

    async def one(number: int, intended: float) -> None:
        numbers.append(number)
        await asyncio.sleep(0.01)

    await _closed_model(plan, time.perf_counter() + plan.duration_s, one)
    assert len(numbers) > 3
    assert all(number % 2 == 1 for number in numbers)  # process 1 of 2 takes the odd numbers
    assert len(set(numbers)) == len(numbers)
