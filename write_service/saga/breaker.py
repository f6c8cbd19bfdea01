"""A circuit breaker around the payment provider.

closed    calls pass; `failure_threshold` consecutive transient failures open it.
open      calls fail fast with CircuitOpen until `cooldown_s` has passed.
half-open one probe call passes (others still fail fast); its success closes the
          breaker, its failure opens it for another cooldown.

Only transient failures (the provider unreachable or too slow) count: a decline or a
refused request is an answer, proof that the provider is up.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class BreakerState(enum.Enum):
    """Where the breaker stands."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitOpen(Exception):
    """The breaker refuses the call; `retry_in_s` says when a probe may pass."""

    def __init__(self, retry_in_s: float) -> None:
        super().__init__(f"payment provider circuit is open; next probe in {retry_in_s:.2f} s")
        self.retry_in_s = retry_in_s


class CircuitBreaker:
    """Consecutive-failure breaker with a cooldown and a single half-open probe."""

    def __init__(self, failure_threshold: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self._threshold = failure_threshold
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False
        self.opened_count = 0

    @property
    def state(self) -> BreakerState:
        """The current state (an open breaker past its cooldown reads as half-open)."""
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._probing or self._clock() - self._opened_at >= self._cooldown_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def before_call(self) -> None:
        """Let the call through or raise CircuitOpen; in half-open only one probe passes at a time."""
        if self._opened_at is None:
            return
        waited = self._clock() - self._opened_at
        if waited < self._cooldown_s:
            raise CircuitOpen(self._cooldown_s - waited)
        if self._probing:
            raise CircuitOpen(self._cooldown_s)
        self._probing = True

    def record_success(self) -> None:
        """The call got an answer: close the breaker."""
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def record_failure(self) -> None:
        """The call failed transiently: count it, and open (or re-open) the breaker when due."""
        if self._probing or self._opened_at is not None:
            self._open()
            return
        self._failures += 1
        if self._failures >= self._threshold:
            self._open()

    def record_abandoned(self) -> None:
        """The call ended without telling anything about the provider (cancelled): free the probe slot."""
        self._probing = False

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._probing = False
        self._failures = 0
        self.opened_count += 1
