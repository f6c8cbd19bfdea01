"""Latency statistics: a log-bucketed histogram that merges across processes, and per-second timelines.

Latencies are kept in buckets whose bounds grow by 1% (like an HDR histogram with two
significant digits): memory stays small whatever the number of samples, histograms from
several client processes merge exactly by adding counts, and every percentile is reported
as the upper bound of its bucket, so it is at most 1% above the true value (and never above
the exact maximum, which is kept separately).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# Relative width of a bucket: a reported percentile is within this fraction above the truth.
GROWTH = 1.01
_LOG_GROWTH = math.log(GROWTH)
# The smallest latency told apart from zero, in milliseconds (one microsecond).
RESOLUTION_MS = 0.001
# The percentiles every summary reports, with their JSON names.
SUMMARY_PERCENTILES: tuple[tuple[str, float], ...] = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p999", 99.9))


def bucket_of(value_ms: float) -> int:
    """The index of the bucket holding `value_ms` (bucket i holds values up to RESOLUTION_MS * GROWTH**i)."""
    if value_ms <= RESOLUTION_MS:
        return 0
    index = math.ceil(math.log(value_ms / RESOLUTION_MS) / _LOG_GROWTH - 1e-9)
    return max(0, index)


def bucket_upper(index: int) -> float:
    """The upper bound, in milliseconds, of bucket `index`."""
    return RESOLUTION_MS * GROWTH**index


@dataclass
class Histogram:
    """Counts of latencies by bucket, with the exact count, sum, minimum and maximum."""

    counts: dict[int, int] = field(default_factory=dict)
    count: int = 0
    total_ms: float = 0.0
    min_ms: float = math.inf
    max_ms: float = 0.0

    def record(self, value_ms: float) -> None:
        """Add one latency, in milliseconds (negative values count as zero)."""
        value_ms = max(0.0, value_ms)
        index = bucket_of(value_ms)
        self.counts[index] = self.counts.get(index, 0) + 1
        self.count += 1
        self.total_ms += value_ms
        self.min_ms = min(self.min_ms, value_ms)
        self.max_ms = max(self.max_ms, value_ms)

    def merge(self, other: Histogram) -> Histogram:
        """Add every sample of `other` to this histogram; returns self."""
        for index, count in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + count
        self.count += other.count
        self.total_ms += other.total_ms
        self.min_ms = min(self.min_ms, other.min_ms)
        self.max_ms = max(self.max_ms, other.max_ms)
        return self

    def percentile(self, percent: float) -> float:
        """The latency at `percent` (0..100) by nearest rank, in milliseconds; 0.0 when empty."""
        if not 0.0 <= percent <= 100.0:
            raise ValueError(f"a percentile is between 0 and 100, not {percent}")
        if self.count == 0:
            return 0.0
        rank = max(1, math.ceil(percent / 100.0 * self.count - 1e-9))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return min(max(bucket_upper(index), self.min_ms), self.max_ms)
        return self.max_ms

    @property
    def mean_ms(self) -> float:
        """The exact mean latency (0.0 when empty)."""
        return self.total_ms / self.count if self.count else 0.0

    def summary(self) -> dict[str, float]:
        """p50, p90, p99, p999 and max in milliseconds, rounded to microseconds."""
        figures = {name: round(self.percentile(percent), 3) for name, percent in SUMMARY_PERCENTILES}
        figures["max"] = round(self.max_ms, 3)
        return figures

    def curve(self, max_nines: int = 5) -> list[tuple[float, float]]:
        """(percentile, latency ms) points spaced evenly on a "nines" scale, up to 100 - 10**-(max_nines - 2)."""
        points: list[tuple[float, float]] = []
        steps_per_nine = 20
        for step in range(max_nines * steps_per_nine + 1):
            nines = step / steps_per_nine
            percent = 100.0 * (1.0 - 10.0**-nines)
            # Beyond the samples the curve would only repeat the maximum.
            if self.count and (100.0 - percent) / 100.0 < 1.0 / self.count:
                break
            points.append((percent, self.percentile(percent)))
        points.append((100.0, self.max_ms))
        return points

    def to_json(self) -> dict[str, object]:
        """A JSON-ready form that `from_json` reads back exactly."""
        return {
            "counts": {str(index): count for index, count in self.counts.items()},
            "count": self.count,
            "total_ms": self.total_ms,
            "min_ms": None if math.isinf(self.min_ms) else self.min_ms,
            "max_ms": self.max_ms,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Histogram:
        """The histogram `to_json` described."""
        counts = data.get("counts", {})
        assert isinstance(counts, dict)
        min_ms = data.get("min_ms")
        return cls(
            counts={int(index): int(count) for index, count in counts.items()},
            count=int(str(data.get("count", 0))),
            total_ms=float(str(data.get("total_ms", 0.0))),
            min_ms=math.inf if min_ms is None else float(str(min_ms)),
            max_ms=float(str(data.get("max_ms", 0.0))),
        )

    @classmethod
    def of(cls, values_ms: Iterable[float]) -> Histogram:
        """A histogram of `values_ms`."""
        histogram = cls()
        for value in values_ms:
            histogram.record(value)
        return histogram


@dataclass
class Second:
    """What completed during one second of a run: latencies of the successful calls and errors by code."""

    latencies: Histogram = field(default_factory=Histogram)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def completed(self) -> int:
        """Calls that ended in this second, successful or not."""
        return self.latencies.count + sum(self.errors.values())

    def merge(self, other: Second) -> Second:
        """Add `other` into this second; returns self."""
        self.latencies.merge(other.latencies)
        add_errors(self.errors, other.errors)
        return self


def add_errors(into: dict[str, int], errors: Mapping[str, int]) -> dict[str, int]:
    """Add error counts by code into `into`; returns it."""
    for code, count in errors.items():
        into[code] = into.get(code, 0) + count
    return into


@dataclass
class Timeline:
    """Seconds of a run (0 = the start of the measuring window), merged across client processes."""

    seconds: dict[int, Second] = field(default_factory=dict)

    def second(self, index: int) -> Second:
        """The record of second `index`, created when missing."""
        if index not in self.seconds:
            self.seconds[index] = Second()
        return self.seconds[index]

    def add(self, index: int, second: Second) -> None:
        """Merge `second` into second `index`."""
        self.second(index).merge(second)

    def total(self) -> Second:
        """Every second merged into one."""
        merged = Second()
        for second in self.seconds.values():
            merged.merge(second)
        return merged

    def rows(self) -> list[tuple[int, int, float, float]]:
        """(second, calls completed, p50 ms, p99 ms) for every second from 0 to the last one."""
        if not self.seconds:
            return []
        rows = []
        for index in range(max(self.seconds) + 1):
            second = self.seconds.get(index, Second())
            rows.append((index, second.completed, second.latencies.percentile(50.0), second.latencies.percentile(99.0)))
        return rows
