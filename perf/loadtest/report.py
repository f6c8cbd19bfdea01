"""The figures of a run: the JSON every mode writes and the summary it prints."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TextIO

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
