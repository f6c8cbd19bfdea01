"""The figures of a run: the JSON every tool writes, the summary it prints, and its plot.

Plots use matplotlib with the Agg backend, imported only when a plot is drawn: the
percentile curve on a "nines" axis, and latency and throughput over time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from perf.loadtest.stats import Histogram, Timeline


def build_report(
    *,
    mode: str,
    engine: str,
    targets: Sequence[str],
    processes: int,
    rate: float | None,
    concurrency: int | None,
    duration_s: float,
    timeline: Timeline,
    elapsed_s: float,
    verified_by: str,
    latencies: Histogram | None = None,
    errors: Mapping[str, int] | None = None,
    ok: int | None = None,
    extra: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """The JSON document of a run (the same keys in every mode; `extra` adds mode-specific ones).

    `latencies` and `errors` default to the timeline's; `ok` to the number of latencies.
    """
    total = timeline.total()
    histogram = latencies if latencies is not None else total.latencies
    error_counts = dict(errors if errors is not None else total.errors)
    ok = histogram.count if ok is None else ok
    requests = ok + sum(error_counts.values())
    report: dict[str, object] = {
        "mode": mode,
        "engine": engine,
        "targets": list(targets),
        "processes": processes,
        "model": "open" if rate is not None else "closed",
        "rate": rate,
        "concurrency": concurrency,
        "duration_s": duration_s,
        "elapsed_s": round(elapsed_s, 3),
        "requests": requests,
        "ok": ok,
        "errors": dict(sorted(error_counts.items())),
        "rps": round(requests / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "ok_rps": round(ok / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "latency_ms": histogram.summary(),
        "latency_mean_ms": round(histogram.mean_ms, 3),
        "timeline": [[index, completed, round(p99, 3)] for index, completed, _p50, p99 in timeline.rows()],
        "timeline_p50_ms": [round(p50, 3) for _index, _completed, p50, _p99 in timeline.rows()],
        "percentile_curve": [[round(percent, 6), round(value, 3)] for percent, value in histogram.curve()],
        "verified_by": verified_by,
    }
    if extra:
        report.update(extra)
    return report


def print_summary(report: Mapping[str, object], out: TextIO) -> None:
    """The human-readable lines: calls/s, percentiles, errors by code."""
    latency = report["latency_ms"]
    errors = report["errors"]
    assert isinstance(latency, dict) and isinstance(errors, dict)
    model = report["model"]
    load = f"rate {report['rate']}/s (open model)" if model == "open" else f"concurrency {report['concurrency']}"
    targets = report["targets"]
    assert isinstance(targets, list)
    out.write(
        f"{report['mode']} · engine {report['engine']} · {report['processes']} process(es) · {load} · "
        f"{report['duration_s']} s · {', '.join(map(str, targets))}\n"
    )
    out.write(f"  requests {report['requests']}   ok {report['ok']}   requests/s {report['rps']}\n")
    out.write(
        "  latency ms   "
        + "   ".join(f"{name} {latency[name]}" for name in ("p50", "p90", "p99", "p999", "max"))
        + "\n"
    )
    if errors:
        out.write("  errors by status code: " + ", ".join(f"{code} {count}" for code, count in errors.items()) + "\n")
    else:
        out.write("  errors: none\n")
    per_replica = report.get("per_replica")
    if isinstance(per_replica, dict):
        for address, figures in per_replica.items():
            assert isinstance(figures, dict)
            lat = figures["latency_ms"]
            assert isinstance(lat, dict)
            out.write(
                f"  {address}: visible after p50 {lat['p50']} ms, p90 {lat['p90']} ms, p99 {lat['p99']} ms, "
                f"max {lat['max']} ms\n"
            )
    out.write(f"  verified by: {report['verified_by']}\n")
    out.flush()


def write_json(path: Path, report: Mapping[str, object]) -> None:
    """Write the report, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


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
