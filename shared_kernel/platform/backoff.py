"""Capped exponential backoff with jitter: the one used by every retry and reconnect loop.

The delay before attempt n (1 for the first retry) is min(cap, initial * factor^(n-1)),
jittered to between half of it and all of it, so that a fleet of processes that failed
together (relays, replicas, saga workers) does not retry in lockstep, and none retries at
once.
"""

from __future__ import annotations

import random


def jittered_delay(
    attempt: int, initial: float, cap: float, factor: float = 2.0, rng: random.Random | None = None
) -> float:
    """Seconds to wait before retry number `attempt` (from 1)."""
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    exponent = min(attempt - 1, 60)  # far past any cap; keeps the power finite
    nominal = min(cap, initial * factor**exponent)
    draw: float = (rng or random).random()
    return nominal / 2 + draw * nominal / 2


class Backoff:
    """The delays of one retry loop: `next_delay()` after each failure, `reset()` after a success."""

    def __init__(self, initial: float = 0.1, cap: float = 5.0, factor: float = 2.0) -> None:
        if initial <= 0 or cap < initial or factor < 1:
            raise ValueError("need 0 < initial <= cap and factor >= 1")
        self._initial = initial
        self._cap = cap
        self._factor = factor
        self.attempts = 0

    @property
    def nominal(self) -> float:
        """The upper bound of the next delay (for logs)."""
        return min(self._cap, self._initial * self._factor ** min(self.attempts, 60))

    def next_delay(self) -> float:
        """The delay before the next attempt; each call counts one failed attempt."""
        self.attempts += 1
        return jittered_delay(self.attempts, self._initial, self._cap, self._factor)

    def reset(self) -> None:
        """Start again from `initial` after a success."""
        self.attempts = 0
