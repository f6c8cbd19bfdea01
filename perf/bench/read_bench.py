"""Figures 1 to 3: the read side, from `python -m perf read` run as a subprocess.

That tool measures a bare grpc.aio server, a replica's near-cache hit path and its Redis path,
and the latency at half the replica's maximum, all in one run. A second run (`--defaults
--auth`) measures a replica as `make up` starts it, with authentication on, beside the bare
server again: what a user who load-tests the defaults gets. This module runs the tool, reads
its JSON, and turns it into rows; when the tool is missing, fails or writes something
unexpected, the rows say "not measured" and why.
"""

from __future__ import annotations

from typing import Any

from perf.bench.table import Goal, Row, not_measured
from perf.bench.tools import ToolError, number, run_json_tool

MODULE = "perf read"


def read_rows() -> list[Row]:
    """The rows this bench fills."""
    return [
        Row(
            key="read",
            figure="read replica hot key (near cache), GetUser calls/s",
            unit="/s",
            goal=Goal("ratio", ">=", 0.85),
            how=MODULE,
            ceiling_label="bare grpc.aio server, constant reply",
        ),
        Row(
            key="read",
            figure="read replica cold key (Redis), GetUser calls/s",
            unit="/s",
            goal=Goal("ratio", ">=", 0.50),
            how=MODULE,
            ceiling_label="bare grpc.aio server, constant reply",
        ),
        Row(
            key="read",
            figure="read replica with make up's defaults (auth on), GetUser calls/s",
            unit="/s",
            goal=Goal("ratio", ">=", 0.50),
            how=f"{MODULE} --defaults --auth",
            ceiling_label="bare grpc.aio server, constant reply",
        ),
        Row(
            key="read",
            figure="read p99 at half the maximum rate",
            unit="ms",
            goal=Goal("value", "<=", 10.0, "ms"),
            how=MODULE,
        ),
    ]


ReportError = ToolError  # what a report with a missing or mistyped field raises


def rows_from_report(report: Any) -> list[Row]:
    """Rows from the read bench's JSON (see the module docstring of perf.read)."""
    if not isinstance(report, dict):
        raise ReportError("the read bench report is not a JSON object")
    hot, cold, _defaults, half = read_rows()
    bare = number(report, "bare_rps")
    engine = str(report.get("engine", "?"))
    hot.value, hot.ceiling = number(report, "hot_rps"), bare
    cold.value, cold.ceiling = number(report, "cold_rps"), bare
    latency = report.get("half_rate_latency_ms")
    if not isinstance(latency, dict):
        raise ReportError("the read bench report has no object 'half_rate_latency_ms'")
    half.value = number(latency, "p99")
    rate = number(report, "half_rate_rps")
    for row in (hot, cold):
        row.how = f"{MODULE}, engine {engine}, closed model"
    half.how = f"{MODULE}, python engine, open model at {rate:,.0f}/s (replica without near cache)"
    if "p50" in latency:
        half.notes.append(f"p50 {number(latency, 'p50'):.2f} ms at {rate:,.0f} calls/s")
    by_second = report.get("half_rate_p99_ms_by_second")
    if isinstance(by_second, list) and by_second:
        half.notes.append("p99 of each second: " + ", ".join(f"{value:g}" for value in by_second) + " ms")
    for note in report.get("notes", []) or []:
        hot.notes.append(str(note))
    return [hot, cold, half]


def defaults_row_from_report(report: Any) -> Row:
    """The defaults row from the JSON of a `--defaults` run."""
    if not isinstance(report, dict):
        raise ReportError("the read bench report is not a JSON object")
    row = read_rows()[2]
    row.value, row.ceiling = number(report, "defaults_rps"), number(report, "bare_rps")
    row.how = f"{MODULE} --defaults --auth, engine {report.get('engine', '?')}, closed model"
    row.notes.extend(str(note) for note in report.get("notes", []) or [])
    return row


def measure_read(duration_s: float, timeout_s: float = 600.0) -> list[Row]:
    """Run the read bench for `duration_s` per measurement; rows marked not measured when it cannot run."""
    duration = ["--duration", f"{duration_s:g}"]
    try:
        hot, cold, half = rows_from_report(run_json_tool(MODULE, duration, timeout_s))
    except ToolError as exc:
        hot, cold, half = not_measured([read_rows()[i] for i in (0, 1, 3)], str(exc))
    try:
        defaults = defaults_row_from_report(run_json_tool(MODULE, ["--defaults", "--auth", *duration], timeout_s))
    except ToolError as exc:
        defaults = read_rows()[2].fail(str(exc))
    return [hot, cold, defaults, half]
