"""Plots of a run (matplotlib, Agg backend): the percentile curve and latency and throughput over time."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Percentiles marked on the "nines" axis: position = -log10(1 - p/100).
_NINES_TICKS = (
    (50.0, "50"),
    (90.0, "90"),
    (99.0, "99"),
    (99.9, "99.9"),
    (99.99, "99.99"),
    (99.999, "99.999"),
)
_MAX_NINES = 5.0


def nines(percent: float) -> float:
    """Where `percent` sits on the nines axis (90 → 1, 99 → 2, …); 100 is drawn at the axis' end."""
    if percent >= 100.0:
        return _MAX_NINES
    return min(_MAX_NINES, -math.log10(1.0 - percent / 100.0))


def _series(report: Mapping[str, object], key: str) -> list[list[float]]:
    value = report.get(key, [])
    assert isinstance(value, list)
    return [[float(item) for item in row] for row in value]


def plot_report(report: Mapping[str, object], path: Path, *, title: str = "") -> None:
    """Draw the two panels of `report` (the JSON of any mode) into the PNG `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = _series(report, "percentile_curve")
    timeline = _series(report, "timeline")
    p50s = report.get("timeline_p50_ms", [])
    assert isinstance(p50s, list)
    latency = report["latency_ms"]
    assert isinstance(latency, dict)

    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), dpi=110, layout="constrained")
    heading = title or f"{report['mode']} · {report['engine']}"
    load = f"{report['rate']}/s open model" if report["model"] == "open" else f"{report['concurrency']} in flight"
    errors = report["errors"]
    assert isinstance(errors, dict)
    figure.suptitle(
        f"{heading} — {load}, {report['processes']} process(es), {report['requests']} calls, "
        f"{report['rps']} calls/s, errors {sum(int(count) for count in errors.values())}",
        fontsize=11,
    )
    _draw_percentiles(left, curve, latency, report.get("per_replica"))
    _draw_timeline(right, timeline, [float(value) for value in p50s])
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def _draw_percentiles(left: Any, curve: list[list[float]], latency: Mapping[str, object], per_replica: object) -> None:

    left.set_title("Latency by percentile", fontsize=10)
    if curve:
        left.plot([nines(p) for p, _ in curve], [v for _, v in curve], color="#1f77b4", lw=2, label="all")
    left.set_xticks([nines(p) for p, _ in _NINES_TICKS], [label for _, label in _NINES_TICKS])
    left.set_xlim(0, _MAX_NINES)
    left.set_xlabel("percentile")
    left.set_ylabel("latency (ms)")
    left.set_yscale("log")
    positive = [value for _, value in curve if value > 0]
    if positive:
        left.set_ylim(bottom=min(positive) * 0.8)
    left.grid(True, which="both", alpha=0.3)
    for name, colour in (("p50", "#2ca02c"), ("p99", "#d62728"), ("p999", "#9467bd")):
        value = float(str(latency[name]))
        if value > 0:
            left.axhline(value, color=colour, lw=0.8, ls="--", alpha=0.7, label=f"{name} {value:.2f} ms")
    if isinstance(per_replica, dict) and len(per_replica) > 1:
        for address, figures in per_replica.items():
            # Legend-only entries: one line per replica.
            left.plot([], [], " ", label=f"{address}: p99 {figures['latency_ms']['p99']} ms")
    left.legend(loc="lower right", fontsize=8)


def _draw_timeline(right: Any, timeline: list[list[float]], p50s: list[float]) -> None:
    right.set_title("Over time (per second)", fontsize=10)
    seconds = [row[0] for row in timeline]
    throughput = [row[1] for row in timeline]
    p99s = [row[2] for row in timeline]
    medians = p50s[: len(seconds)]
    bars = right.twinx()
    bars.bar(seconds, throughput, width=0.8, color="#7f7f7f", alpha=0.25, label="calls/s")
    bars.set_ylabel("calls completed per second")
    right.set_zorder(bars.get_zorder() + 1)
    right.patch.set_visible(False)
    right.plot(seconds[: len(medians)], medians, marker="o", ms=3, color="#2ca02c", label="p50")
    right.plot(seconds, p99s, marker="o", ms=3, color="#d62728", label="p99")
    right.set_xlabel("second of the run")
    right.set_ylabel("latency (ms)")
    right.set_ylim(bottom=0)
    if seconds:
        right.set_xlim(-0.6, max(seconds) + 0.6)
    from matplotlib.ticker import MaxNLocator

    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.grid(True, alpha=0.3)
    lines, labels = right.get_legend_handles_labels()
    more_lines, more_labels = bars.get_legend_handles_labels()
    right.legend(lines + more_lines, labels + more_labels, loc="upper left", fontsize=8)


def main(argv: list[str] | None = None) -> int:
    """`python -m perf plot REPORT.json OUT.png`: redraw a saved report."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Draw the PNG of a JSON report written by loadtest or lag.")
    parser.add_argument("report", type=Path, help="JSON report (loadtest read|write|lag --json)")
    parser.add_argument("out", type=Path, help="PNG to write")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text(encoding="utf-8"))
    if not isinstance(report, dict):
        parser.error(f"{args.report} holds no JSON object")
    plot_report(report, args.out, title=args.title)
    return 0
