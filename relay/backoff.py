"""Capped exponential backoff with jitter, for reconnect and retry loops."""

from __future__ import annotations

import random


class Backoff:
    """Delays that double from `initial` up to `cap`, each jittered to half..full of its nominal value."""

    def __init__(self, initial: float = 0.1, cap: float = 5.0, factor: float = 2.0) -> None:
        if initial <= 0 or cap < initial or factor < 1:
            raise ValueError("need 0 < initial <= cap and factor >= 1")
        self._initial = initial
        self._cap = cap
        self._factor = factor
        self._nominal = initial
        self.attempts = 0

    def next_delay(self) -> float:
        """The delay before the next attempt; each call counts one failed attempt."""
        self.attempts += 1
        nominal = self._nominal
        self._nominal = min(self._cap, self._nominal * self._factor)
        # Jitter keeps a fleet of standbys from hammering a recovering server in lockstep.
        return random.uniform(nominal / 2, nominal)  # noqa: S311 - not used for security

    def reset(self) -> None:
        """Start again from `initial` after a success."""
        self._nominal = self._initial
        self.attempts = 0
