"""The restart policy: capped exponential backoff, crashes in a row, and the reset after a stable run."""

from __future__ import annotations

from typing import Any

import pytest

from devstack.restart_policy import RestartPolicy, RestartTracker, ServiceState


def _state(tracker: RestartTracker) -> ServiceState:
    """The tracker's state, read afresh (each call may follow a transition)."""
    return tracker.state


def test_backoff_doubles_per_crash_and_stops_at_the_cap() -> None:
    policy = RestartPolicy(backoff_s=0.5, max_backoff_s=3.0)
    assert [policy.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_quick_crashes_in_a_row_end_in_failed() -> None:
    tracker = RestartTracker(RestartPolicy(backoff_s=1.0, max_backoff_s=10.0, max_crashes=3, stable_after_s=30.0))
    assert tracker.crashed(now=100.0, uptime_s=0.2) == 1.0
    assert _state(tracker) is ServiceState.BACKOFF
    assert not tracker.due(100.9)
    assert tracker.due(101.0)
    tracker.restarted()
    assert _state(tracker) is ServiceState.RUNNING
    assert tracker.crashed(now=102.0, uptime_s=1.0) == 2.0
    tracker.restarted()
    assert tracker.crashed(now=105.0, uptime_s=1.0) is None
    assert _state(tracker) is ServiceState.FAILED
    assert not tracker.due(1_000.0)  # a failed service is never started again
    assert (tracker.crashes, tracker.restarts) == (3, 2)


def test_a_stable_run_resets_the_count_and_the_backoff() -> None:
    tracker = RestartTracker(RestartPolicy(backoff_s=1.0, max_backoff_s=10.0, max_crashes=3, stable_after_s=30.0))
    assert tracker.crashed(now=0.0, uptime_s=5.0) == 1.0
    tracker.restarted()
    assert tracker.crashed(now=10.0, uptime_s=5.0) == 2.0
    tracker.restarted()
    # Ran 30 s this time: healthy, so this crash is the first of a new series, not the third.
    assert tracker.crashed(now=50.0, uptime_s=30.0) == 1.0
    assert _state(tracker) is ServiceState.BACKOFF
    assert (tracker.crashes, tracker.restarts) == (1, 2)


def test_max_crashes_of_one_gives_up_at_the_first_crash() -> None:
    tracker = RestartTracker(RestartPolicy(max_crashes=1))
    assert tracker.crashed(now=0.0, uptime_s=100.0) is None
    assert _state(tracker) is ServiceState.FAILED


@pytest.mark.parametrize(
    "options",
    [{"backoff_s": -1.0}, {"backoff_s": 5.0, "max_backoff_s": 1.0}, {"max_crashes": 0}, {"stable_after_s": 0.0}],
)
def test_parameters_that_cannot_work_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RestartPolicy(**options)
