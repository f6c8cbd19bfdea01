"""The open model's schedule and the closed model's split over processes; the request mix."""

from __future__ import annotations

import pytest

from perf.loadtest.requests import parse_mix
from perf.loadtest.schedule import due_offsets, effective_processes, planned_requests, split_evenly


def test_the_number_of_requests_is_those_due_before_the_end() -> None:
    assert planned_requests(100.0, 2.0) == 200
    assert planned_requests(3.0, 1.0) == 3
    assert planned_requests(2.5, 1.0) == 3  # due at 0, 0.4 and 0.8 s
    assert planned_requests(0.0, 5.0) == 0


@pytest.mark.parametrize("processes", [1, 2, 3, 7])
def test_processes_together_keep_the_exact_spacing(processes: int) -> None:
    rate, duration = 250.0, 1.3
    merged = sorted(
        offset for index in range(processes) for _number, offset in due_offsets(rate, duration, index, processes)
    )
    assert len(merged) == planned_requests(rate, duration)
    assert merged == [number / rate for number in range(len(merged))]
    assert merged[-1] < duration


def test_each_request_is_sent_by_exactly_one_process() -> None:
    numbers = [number for index in range(4) for number, _ in due_offsets(10.0, 3.0, index, 4)]
    assert sorted(numbers) == list(range(30))


def test_a_process_index_outside_the_range_is_refused() -> None:
    with pytest.raises(ValueError, match=r"not in 0\.\.1"):
        list(due_offsets(10.0, 1.0, 2, 2))


def test_concurrency_splits_evenly_and_limits_the_processes() -> None:
    assert split_evenly(10, 3) == [4, 3, 3]
    assert sum(split_evenly(64, 5)) == 64
    assert effective_processes(4, 2) == 2
    assert effective_processes(4, None) == 4
    with pytest.raises(ValueError):
        effective_processes(0, None)


def test_the_mix_is_parsed_and_checked() -> None:
    assert parse_mix("get_user=50,get_product=25") == {"get_user": 50, "get_product": 25}
    assert parse_mix("get_order") == {"get_order": 1}
    assert parse_mix("get_user=0,get_order=3") == {"get_order": 3}
    with pytest.raises(ValueError, match="unknown query kind 'get_cat'"):
        parse_mix("get_cat=1")
    with pytest.raises(ValueError, match="whole number"):
        parse_mix("get_user=x")
    with pytest.raises(ValueError, match="no query kind"):
        parse_mix("get_user=0")
