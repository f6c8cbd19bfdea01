"""Turning other tools' JSON into bench rows, the size profiles, and the report header."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from perf.bench import read_bench, tools
from perf.bench.lag_bench import FIXED, HALF_MAX, fill_lag_rows, lag_rows, schedule_rows
from perf.bench.read_bench import ReportError, rows_from_report
from perf.bench.run import BENCHES, blank_rows, report_header, sizes_for, unmeasured_figures
from perf.bench.run import main as bench_main
from perf.bench.table import NOT_MEASURED, cells
from perf.bench.tools import ToolError
from perf.bench.write_bench import ok_rps


def _report(**overrides: Any) -> dict[str, Any]:
    report: dict[str, Any] = {
        "engine": "h2load",
        "bare_rps": 20_000,
        "hot_rps": 18_000,
        "cold_rps": 9_000,
        "hot_ratio": 0.9,
        "cold_ratio": 0.45,
        "half_rate_rps": 4_500,
        "half_rate_latency_ms": {"p50": 1.5, "p90": 3.0, "p99": 8.25},
        "half_rate_p99_ms_by_second": [3.1, 41.5, 2.9],
        "notes": ["replicas ran one worker each"],
    }
    report.update(overrides)
    return report


def test_read_report_becomes_three_rows() -> None:
    hot, cold, half = rows_from_report(_report())
    assert (hot.value, hot.ceiling, hot.met) == (18_000, 20_000, True)
    assert hot.ratio == pytest.approx(0.9)
    assert (cold.value, cold.ceiling, cold.met) == (9_000, 20_000, False)  # 0.45 < 0.50
    assert (half.value, half.ceiling, half.met) == (8.25, None, True)
    assert "h2load" in hot.how
    assert "4,500/s" in half.how
    assert hot.notes == ["replicas ran one worker each"]
    assert any("p50 1.50 ms" in note for note in half.notes)
    assert "p99 of each second: 3.1, 41.5, 2.9 ms" in half.notes


@pytest.mark.parametrize(
    "report",
    [
        [],
        _report(bare_rps=None),
        _report(hot_rps="fast"),
        _report(cold_rps=True),
        _report(half_rate_latency_ms=None),
        _report(half_rate_latency_ms={"p50": 1.0}),
        {key: value for key, value in _report().items() if key != "half_rate_rps"},
    ],
)
def test_read_report_with_missing_or_wrong_fields_is_refused(report: Any) -> None:
    with pytest.raises(ReportError):
        rows_from_report(report)


def test_missing_read_tool_gives_not_measured_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tools, "module_available", lambda module: False)
    rows = read_bench.measure_read(1.0)
    assert len(rows) == 4
    for row in rows:
        assert row.error is not None and "not available" in row.error
        assert cells(row)[5] == NOT_MEASURED


def test_failing_read_tool_gives_not_measured_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tools, "module_available", lambda module: True)
    monkeypatch.setattr(tools, "run_tool", lambda argv, timeout_s: (3, "starting\nTraceback\nBoom: it broke\n"))
    rows = read_bench.measure_read(1.0)
    assert all(row.error is not None and "exited with 3" in row.error and "Boom" in row.error for row in rows)


@pytest.mark.parametrize("name", BENCHES)
def test_every_bench_has_rows_with_goals(name: str) -> None:
    rows = blank_rows(name, sizes_for("quick"))
    assert rows
    assert all(row.key == name and row.value is None for row in rows)
    # A row without a goal is a ceiling shown for its own sake; every other row has one.
    assert all(row.goal is not None or row.figure.startswith("ceiling:") for row in rows)
    assert any(row.goal is not None for row in rows)


def test_profiles_grow_from_quick_to_full() -> None:
    quick, default, full = (sizes_for(name) for name in ("quick", "default", "full"))
    assert quick.memory.events < default.memory.events < full.memory.events
    assert (full.memory.events, full.memory.commands) == (1_000_000, 100_000)
    assert quick.relay.events < default.relay.events == 100_000
    with pytest.raises(ValueError, match="unknown profile"):
        sizes_for("huge")


def test_report_header_names_machine_sizes_and_command() -> None:
    facts = {"cores": "2", "cpu": "Some CPU", "os": "Linux 6", "python": "3.11.7", "postgres": "16.2", "redis": "7.2"}
    lines = report_header(
        facts, sizes_for("quick"), "python -m perf bench --quick", datetime(2026, 1, 2, 3, 4, tzinfo=UTC), 90
    )
    text = "\n".join(lines)
    assert "`python -m perf bench --quick`" in text
    assert "2026-01-02 03:04 UTC" in text
    assert "2 cores, Some CPU" in text
    assert "PostgreSQL 16.2" in text and "Redis 7.2" in text
    assert "20,000 events and 5,000 commands per run" in text


def _lag_report(**overrides: Any) -> dict[str, Any]:
    report: dict[str, Any] = {
        "duration_s": 10.0,
        "commands": 500,
        "errors": {},
        "command_latency_ms": {"p50": 4.0, "p99": 9.0},
        "per_replica": {
            "127.0.0.1:1": {"latency_ms": {"p50": 3.5, "p99": 12.0, "max": 15.0}, "visible": 500},
            "127.0.0.1:2": {"latency_ms": {"p50": 6.0, "p99": 30.0, "max": 31.0}, "visible": 500},
        },
    }
    report.update(overrides)
    return report


def test_lag_report_fills_p50_and_p99_per_replica() -> None:
    rows = schedule_rows(FIXED, 2)
    fill_lag_rows(rows, _lag_report(), ["127.0.0.1:1", "127.0.0.1:2"], 100.0, "", busy_cores=1.75, settled_s=0.4)
    assert [row.value for row in rows] == [3.5, 12.0, 6.0, 30.0]
    assert [row.met for row in rows] == [True, True, False, False]  # goals: p50 ≤ 5 ms, p99 ≤ 20 ms
    assert "100 AddProduct/s" in rows[0].notes[0]
    assert "fresh command was visible on every replica (400 ms)" in rows[0].notes[1]
    assert rows[0].notes[2].startswith("the machine was busy 1.75 of its ")


def test_lag_rows_are_the_fixed_rate_then_half_max_with_the_issues_goals() -> None:
    rows = lag_rows(2)
    assert len(rows) == 6
    assert all("100 AddProduct/s" in row.figure for row in rows[:4])
    assert all("half the max write rate" in row.figure and "p99" in row.figure for row in rows[4:])
    assert [row.goal.threshold for row in rows if row.goal] == [5.0, 20.0, 5.0, 20.0, 20.0, 20.0]


def test_half_max_rows_are_p99_with_the_p50_in_their_notes() -> None:
    rows = schedule_rows(HALF_MAX, 2)
    fill_lag_rows(rows, _lag_report(), ["127.0.0.1:1", "127.0.0.1:2"], 197.0, " (probed)")
    assert [row.value for row in rows] == [12.0, 30.0]
    assert [row.met for row in rows] == [True, False]
    assert "p50 3.5 ms (no goal)" in rows[0].notes and "p50 6.0 ms (no goal)" in rows[1].notes


def test_half_max_rows_of_a_replica_that_showed_nothing_are_not_measured() -> None:
    rows = schedule_rows(HALF_MAX, 2)
    report = _lag_report()
    report["per_replica"]["127.0.0.1:1"]["visible"] = 0
    fill_lag_rows(rows, report, ["127.0.0.1:1", "127.0.0.1:2"], 197.0, "")
    assert rows[0].error is not None and "127.0.0.1:1" in rows[0].error
    assert rows[1].value == 30.0


def test_lag_report_without_a_replica_marks_its_rows_not_measured() -> None:
    rows = schedule_rows(FIXED, 2)
    report = _lag_report()
    report["per_replica"]["127.0.0.1:2"]["visible"] = 0
    fill_lag_rows(rows, report, ["127.0.0.1:1", "127.0.0.1:2"], 250.0, "")
    assert rows[0].error is None and rows[1].error is None
    assert rows[2].error is not None and "127.0.0.1:2" in rows[2].error
    assert rows[3].met is None


def test_lag_report_without_per_replica_is_refused() -> None:
    with pytest.raises(ToolError):
        fill_lag_rows(schedule_rows(FIXED, 1), _lag_report(per_replica=None), ["127.0.0.1:1"], 1.0, "")


def test_write_rate_prefers_successful_calls() -> None:
    assert ok_rps({"ok_rps": 400.0, "rps": 450.0}) == 400.0
    assert ok_rps({"rps": 450}) == 450.0
    with pytest.raises(ToolError):
        ok_rps({"rps": "fast"})


def test_a_markdown_file_without_markers_is_refused_before_anything_runs(tmp_path: Path) -> None:
    document = tmp_path / "BENCH.md"
    document.write_text("# no markers here\n")
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["--only", "write", "--markdown", str(document)])
    assert exit_info.value.code == 2
    assert document.read_text() == "# no markers here\n"


def test_strict_fails_on_a_figure_not_measured_never_on_a_missed_goal() -> None:
    missed, broken = schedule_rows(FIXED, 1)
    missed.value = 900.0  # far over its goal
    assert missed.met is False
    assert unmeasured_figures([missed, broken]) == []
    broken.fail("the lag tool exited 1")
    assert unmeasured_figures([missed, broken]) == [broken.figure]
