"""The delay before a retried saga step, from the shared backoff (settings are in milliseconds)."""

from __future__ import annotations

import random

from shared_kernel.platform.backoff import jittered_delay


def backoff_delay_s(attempt: int, base_ms: int, cap_ms: int, rng: random.Random | None = None) -> float:
    """Delay before retry number `attempt` (1 for the first): min(cap, base * 2^(attempt-1)), jittered."""
    return jittered_delay(attempt, base_ms / 1000, cap_ms / 1000, rng=rng)
