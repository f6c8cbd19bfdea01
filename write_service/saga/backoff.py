"""Capped exponential backoff with jitter for retried saga steps."""

from __future__ import annotations

import random


def backoff_delay_s(attempt: int, base_ms: int, cap_ms: int, rng: random.Random | None = None) -> float:
    """Delay before retry number `attempt` (1 for the first): min(cap, base * 2^(attempt-1)), jittered.

    "Equal jitter": half of the capped delay is kept, the other half is random, so retries
    of many sagas that failed together spread out but none retries almost at once.
    """
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    exponent = min(attempt - 1, 40)  # 2**40 ms is past any sensible cap; avoids huge integers
    capped = min(cap_ms, base_ms << exponent)
    draw: float = (rng or random).random()
    return (capped / 2 + draw * capped / 2) / 1000
