"""The load tester's histogram: percentiles within 1%, exact merging across processes, JSON round trips."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from perf.loadtest.stats import GROWTH, Histogram, Second, Timeline, bucket_of, bucket_upper


def exact_percentile(values: list[float], percent: float) -> float:
    ordered = sorted(values)
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return ordered[rank - 1]


def test_a_value_lies_in_its_bucket() -> None:
    for value in (0.0011, 0.5, 1.0, 3.3, 250.0, 12_345.6):
        index = bucket_of(value)
        assert bucket_upper(index - 1) < value <= bucket_upper(index) * (1 + 1e-9)


@pytest.mark.parametrize("percent", [0.0, 1.0, 50.0, 90.0, 99.0, 99.9, 100.0])
def test_percentiles_are_within_one_bucket_above_the_exact_value(percent: float) -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(0.5, 1.2) for _ in range(20_000)]
    histogram = Histogram.of(values)
    exact = exact_percentile(values, percent)
    assert exact <= histogram.percentile(percent) * (1 + 1e-9)
    assert histogram.percentile(percent) <= exact * GROWTH * (1 + 1e-9)


def test_the_maximum_and_count_are_exact() -> None:
    histogram = Histogram.of([1.0, 2.0, 3.0, 1000.0])
    assert histogram.count == 4
    assert histogram.max_ms == 1000.0
    assert histogram.percentile(100.0) == 1000.0
    assert histogram.mean_ms == pytest.approx(251.5)


def test_merging_equals_recording_everything_in_one() -> None:
    rng = random.Random(11)
    parts = [[rng.expovariate(0.2) for _ in range(1000)] for _ in range(4)]
    merged = Histogram()
    for part in parts:
        merged.merge(Histogram.of(part))
    whole = Histogram.of([value for part in parts for value in part])
    assert merged.counts == whole.counts
    assert merged.count == whole.count
    assert merged.max_ms == whole.max_ms
    assert merged.min_ms == whole.min_ms
    assert merged.summary() == whole.summary()


def test_json_round_trip_is_exact() -> None:
    histogram = Histogram.of([0.2, 0.3, 5.0, 5.0, 70.0])
    again = Histogram.from_json(histogram.to_json())
    assert again == histogram
    assert Histogram.from_json(Histogram().to_json()) == Histogram()


def test_an_empty_histogram_reports_zeros_and_refuses_bad_percentiles() -> None:
    assert Histogram().summary() == {"p50": 0.0, "p90": 0.0, "p99": 0.0, "p999": 0.0, "max": 0.0}
    with pytest.raises(ValueError, match="between 0 and 100"):
        Histogram().percentile(101.0)


def test_summary_percentiles_are_ordered() -> None:
    rng = random.Random(3)
    summary = Histogram.of(rng.paretovariate(1.5) for _ in range(5000)).summary()
    assert summary["p50"] <= summary["p90"] <= summary["p99"] <= summary["p999"] <= summary["max"]


def test_the_curve_rises_and_ends_at_the_maximum() -> None:
    histogram = Histogram.of(float(value) for value in range(1, 1001))
    curve = histogram.curve()
    assert curve[-1] == (100.0, 1000.0)
    assert all(a[1] <= b[1] for a, b in itertools.pairwise(curve))
    # No point claims a finer percentile than 1000 samples can tell.
    assert all(100.0 - percent >= 0.1 - 1e-9 or percent == 100.0 for percent, _ in curve)


def test_timeline_merges_seconds_from_several_processes() -> None:
    timeline = Timeline()
    timeline.add(0, Second(Histogram.of([1.0, 2.0]), {"UNAVAILABLE": 1}))
    timeline.add(0, Second(Histogram.of([3.0]), {"UNAVAILABLE": 2, "INTERNAL": 1}))
    timeline.add(2, Second(Histogram.of([4.0])))
    rows = timeline.rows()
    assert [row[:2] for row in rows] == [(0, 7), (1, 0), (2, 1)]
    total = timeline.total()
    assert total.latencies.count == 4
    assert total.errors == {"UNAVAILABLE": 3, "INTERNAL": 1}
