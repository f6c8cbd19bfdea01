"""The chaos suite's figures: one record per scenario, a table for the terminal, a dict for JSON."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Figures every scenario reports, in table order: (key, column heading).
COLUMNS: tuple[tuple[str, str], ...] = (
    ("commands", "cmds"),
    ("acked", "acked"),
    ("retried_commands", "retried"),
    ("unknown", "retry-code"),
    ("faults", "faults"),
    ("lost_events", "lost"),
    ("duplicate_deliveries", "dup deliv"),
    ("out_of_order", "out of order"),
    ("duplicate_effects", "dup effects"),
    ("half_applied", "half applied"),
    ("diverged_views", "diverged"),
    ("max_publish_lag_s", "max lag s"),
    ("converge_s", "converge s"),
)


@dataclass
class ScenarioRecord:
    """What one scenario measured, and whether its invariants held."""

    name: str
    title: str
    figures: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    skipped: str = ""  # why the scenario could not run, if it could not

    @property
    def passed(self) -> bool:
        """Whether every invariant held."""
        return not self.failures

    @property
    def result(self) -> str:
        """pass, FAIL or skipped."""
        if self.skipped:
            return "skipped"
        return "pass" if self.passed else "FAIL"


@dataclass
class ChaosReport:
    """Every scenario that ran in this session, in order."""

    scenarios: list[ScenarioRecord] = field(default_factory=list)
    written_to: Path | None = None
    echo: Callable[[str], None] = print  # where each scenario's figures go as it finishes

    def add(self, record: ScenarioRecord) -> None:
        """Add (or replace, on a re-run) a scenario's record."""
        self.scenarios = [s for s in self.scenarios if s.name != record.name]
        self.scenarios.append(record)

    def as_dict(self) -> dict[str, Any]:
        """The records keyed by scenario name, for JSON."""
        return {
            s.name: {
                "title": s.title,
                "passed": s.passed,
                "result": s.result,
                "skipped": s.skipped,
                "duration_s": round(s.duration_s, 1),
                "figures": s.figures,
                "failures": s.failures,
                "notes": s.notes,
            }
            for s in self.scenarios
        }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def format_table(report: ChaosReport) -> list[str]:
    """The figures as fixed-width text lines, one row per scenario."""
    headings = ["scenario", *(heading for _, heading in COLUMNS), "time s", "result"]
    rows = [
        [
            s.name,
            *(_cell(s.figures.get(key)) for key, _ in COLUMNS),
            f"{s.duration_s:.0f}",
            s.result,
        ]
        for s in sorted(report.scenarios, key=lambda s: s.name)
    ]
    widths = [max(len(row[i]) for row in [headings, *rows]) for i in range(len(headings))]
    lines = [
        "  ".join(
            text.rjust(width) if i else text.ljust(width)
            for i, (text, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in [headings, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    for s in sorted(report.scenarios, key=lambda s: s.name):
        lines.extend(f"{s.name}: FAILED {failure}" for failure in s.failures)
        if s.skipped:
            lines.append(f"{s.name}: skipped: {s.skipped}")
    return lines
