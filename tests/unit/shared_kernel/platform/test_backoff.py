"""The shared backoff: jittered doubling up to a cap, reset after success."""

from __future__ import annotations

import random

import pytest

from shared_kernel.platform.backoff import Backoff, jittered_delay


def test_doubles_up_to_the_cap_with_jitter() -> None:
    backoff = Backoff(initial=0.1, cap=1.0)
    nominal = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    for expected in nominal:
        delay = backoff.next_delay()
        assert expected / 2 <= delay <= expected
    assert backoff.attempts == len(nominal)


def test_reset_starts_over() -> None:
    backoff = Backoff(initial=0.1, cap=1.0)
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.attempts == 0
    assert backoff.next_delay() <= 0.1


@pytest.mark.parametrize(("initial", "cap", "factor"), [(0, 1, 2), (2, 1, 2), (0.1, 1, 0.5)])
def test_rejects_nonsense(initial: float, cap: float, factor: float) -> None:
    with pytest.raises(ValueError):
        Backoff(initial=initial, cap=cap, factor=factor)


def test_jittered_delay_is_between_half_and_all_of_the_capped_nominal() -> None:
    rng = random.Random(5)
    for attempt in range(1, 12):
        nominal = min(2.0, 0.05 * 2 ** (attempt - 1))
        delays = [jittered_delay(attempt, 0.05, 2.0, rng=rng) for _ in range(40)]
        assert all(nominal / 2 <= delay <= nominal for delay in delays)
        assert len(set(delays)) > 30
    with pytest.raises(ValueError, match="attempt"):
        jittered_delay(0, 0.05, 2.0)
