"""The arithmetic of the two load models.

Open model (`--rate R`): the run's requests are numbered 0, 1, 2, … and request g is due at
g / R seconds after the start, whatever happened to earlier requests. With P client processes,
process k sends the requests g ≡ k (mod P), so the processes together keep the exact spacing
1 / R. A request's latency counts from when it was due, not from when it was sent: a client
or server that falls behind shows up as latency instead of silently sending less (no
coordinated omission).

Closed model (`--concurrency C`): C loops, each sending its next request when the previous
reply arrives; the C loops are split over the P processes as evenly as possible.
"""

from __future__ import annotations

import math
from collections.abc import Iterator


def planned_requests(rate: float, duration_s: float) -> int:
    """How many requests an open-model run of `duration_s` at `rate` per second sends (those due before the end)."""
    if rate <= 0 or duration_s <= 0:
        return 0
    return math.ceil(rate * duration_s - 1e-9)


def due_offsets(rate: float, duration_s: float, process_index: int, processes: int) -> Iterator[tuple[int, float]]:
    """(request number, seconds after the start it is due) of every request process `process_index` sends."""
    if not 0 <= process_index < processes:
        raise ValueError(f"process index {process_index} is not in 0..{processes - 1}")
    total = planned_requests(rate, duration_s)
    for number in range(process_index, total, processes):
        yield number, number / rate


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` split into `parts` whole shares that differ by at most one (larger shares first)."""
    if parts <= 0:
        raise ValueError("parts must be positive")
    base, extra = divmod(total, parts)
    return [base + (1 if index < extra else 0) for index in range(parts)]


def effective_processes(requested: int, concurrency: int | None) -> int:
    """Client processes worth starting: no more than the closed model has loops to give them."""
    if requested < 1:
        raise ValueError("--processes must be at least 1")
    if concurrency is not None:
        return max(1, min(requested, concurrency))
    return requested
