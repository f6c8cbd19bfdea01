"""Benchmark rows: a figure beside the ceiling measured in the same run, the goal, and how they render.

A row is measured (value, maybe a ceiling), or not measured (with the reason). The goal is
checked against the ratio to the ceiling or against the value itself. The same rows render
as an aligned text table for the terminal and as a markdown table for BENCHMARKS.md, whose
generated part sits between two markers and is replaced without touching the rest.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

BEGIN_MARKER = "<!-- bench:begin -->"
END_MARKER = "<!-- bench:end -->"

NOT_MEASURED = "not measured"
RATIO_DECIMALS = 2

GoalSubject = Literal["ratio", "value"]
GoalOp = Literal[">=", "<="]

_OPS: dict[GoalOp, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le}
_SIGNS: dict[GoalOp, str] = {">=": "≥", "<=": "≤"}


@dataclass(frozen=True, slots=True)
class Goal:
    """What a row must reach: its ratio to the ceiling, or its value, compared with `threshold`."""

    subject: GoalSubject
    op: GoalOp
    threshold: float
    unit: str = ""

    def met(self, value: float | None, ratio: float | None) -> bool | None:
        """Whether the goal is met; None when the figure it needs was not measured.

        A ratio is judged as the table shows it, to two decimals: run-to-run noise is far larger.
        """
        measured = (None if ratio is None else round(ratio, RATIO_DECIMALS)) if self.subject == "ratio" else value
        if measured is None:
            return None
        return _OPS[self.op](measured, self.threshold)

    def describe(self) -> str:
        """The goal in words, e.g. 'ratio ≥ 0.85' or '≤ 10 ms'."""
        threshold = f"{self.threshold:,g}"
        if self.subject == "ratio":
            return f"ratio {_SIGNS[self.op]} {threshold}"
        return f"{_SIGNS[self.op]} {threshold}{' ' + self.unit if self.unit else ''}"


@dataclass(slots=True)
class Row:
    """One figure of the benchmark."""

    key: str  # the bench it belongs to (what --only selects), e.g. "write"
    figure: str  # what is measured, in words
    unit: str  # of value and ceiling: "/s", "ms", "MB", "events/s"
    goal: Goal | None
    how: str  # engine and client
    value: float | None = None
    ceiling: float | None = None
    ceiling_label: str = ""  # what the ceiling is ("bare asyncpg, same SQL"); empty: goal only
    ceiling_unit: str | None = None  # when the ceiling counts something else than the value (None: `unit`)
    notes: list[str] = field(default_factory=list)
    error: str | None = None  # why it was not measured

    @property
    def ratio(self) -> float | None:
        """value ÷ ceiling, when both were measured and the ceiling is positive."""
        if self.value is None or self.ceiling is None or self.ceiling <= 0:
            return None
        return self.value / self.ceiling

    @property
    def met(self) -> bool | None:
        """Whether the goal is met (None: no goal, or not measured)."""
        if self.goal is None or self.error is not None:
            return None
        return self.goal.met(self.value, self.ratio)

    def fail(self, reason: str) -> Row:
        """Mark the row not measured, for `reason`; returns the row."""
        self.error = reason
        self.value = None
        self.ceiling = None
        return self


def rate_rows(
    key: str, figures: tuple[str, str], value_goal: float, ratio_goal: float, *, how: str, ceiling_label: str
) -> list[Row]:
    """The two rows of a rate in events/s: the rate against `value_goal`, then against its ceiling
    (ratio at least `ratio_goal`); `figures` names them."""
    return [
        Row(
            key=key,
            figure=figures[0],
            unit="events/s",
            goal=Goal("value", ">=", value_goal, "events/s"),
            how=how,
            ceiling_label=ceiling_label,
        ),
        Row(
            key=key,
            figure=figures[1],
            unit="events/s",
            goal=Goal("ratio", ">=", ratio_goal),
            how=how,
            ceiling_label=ceiling_label,
        ),
    ]


def not_measured(rows: Sequence[Row], reason: str) -> list[Row]:
    """The rows, each marked not measured for `reason`."""
    return [row.fail(reason) for row in rows]


def format_number(value: float) -> str:
    """A figure to three significant digits or so, thousands separated: 23,400 / 512 / 3.2 / 0.87."""
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}".removesuffix(".0")
    if magnitude >= 1:
        return f"{value:.2f}".rstrip("0").rstrip(".")
    return f"{value:.2f}" if magnitude >= 0.01 or magnitude == 0 else f"{value:.3g}"


def _with_unit(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    return f"{format_number(value)} {unit}".rstrip()


def _met_text(row: Row) -> str:
    if row.error is not None:
        return NOT_MEASURED
    met = row.met
    if met is None:
        return "—"
    return "yes" if met else "NO"


def cells(row: Row) -> list[str]:
    """The row's cells: figure, value, ceiling, ratio, goal, met?, how measured."""
    if row.error is not None:
        value = f"{NOT_MEASURED}: {row.error}"
        ceiling = "—"
    else:
        value = _with_unit(row.value, row.unit)
        ceiling_unit = row.unit if row.ceiling_unit is None else row.ceiling_unit
        ceiling = _with_unit(row.ceiling, ceiling_unit) if row.ceiling is not None else "—"
        if row.ceiling is not None and row.ceiling_label:
            ceiling = f"{ceiling} ({row.ceiling_label})"
        elif row.ceiling is None and row.ceiling_label:
            ceiling = row.ceiling_label
    ratio = row.ratio
    return [
        row.figure,
        value,
        ceiling,
        f"{ratio:.{RATIO_DECIMALS}f}" if ratio is not None else "—",
        row.goal.describe() if row.goal is not None else "—",
        _met_text(row),
        row.how,
    ]


HEADERS = ["figure", "value", "ceiling / baseline (same run)", "ratio", "goal", "met?", "how measured"]


def render_text(rows: Sequence[Row], *, width_cap: int = 60) -> str:
    """An aligned plain-text table (long cells cut at `width_cap` characters), then the notes."""

    def cut(text: str) -> str:
        return text if len(text) <= width_cap else text[: width_cap - 1] + "…"

    table = [HEADERS, *([cut(cell) for cell in cells(row)] for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADERS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    notes = _numbered_notes(rows)
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown_table(rows: Sequence[Row]) -> str:
    """The rows as a GitHub markdown table."""
    lines = [
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join(["---", "---:", "---:", "---:", "---", "---", "---"]) + "|",
    ]
    lines += ["| " + " | ".join(_escape(cell) for cell in cells(row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _numbered_notes(rows: Sequence[Row]) -> list[str]:
    out: list[str] = []
    for row in rows:
        for note in row.notes:
            out.append(f"- {row.figure}: {note}")
    return out


def render_markdown(rows: Sequence[Row], header: Sequence[str]) -> str:
    """The generated part of BENCHMARKS.md: `header` lines, the table, and each row's notes."""
    parts = [*header, "", render_markdown_table(rows).rstrip("\n")]
    notes = _numbered_notes(rows)
    if notes:
        parts += ["", "Notes:", "", *(_escape(note) for note in notes)]
    return "\n".join(parts) + "\n"


class MarkersMissing(ValueError):
    """The document lacks the begin/end markers (or has them in the wrong order)."""


def replace_between_markers(document: str, generated: str) -> str:
    """`document` with everything between BEGIN_MARKER and END_MARKER replaced by `generated`.

    The markers themselves and all text outside them are kept byte for byte.
    """
    begin = document.find(BEGIN_MARKER)
    end = document.find(END_MARKER)
    if begin < 0 or end < 0 or end < begin:
        raise MarkersMissing(f"the document needs {BEGIN_MARKER} followed by {END_MARKER}")
    if document.find(BEGIN_MARKER, begin + 1) >= 0 or document.find(END_MARKER, end + 1) >= 0:
        raise MarkersMissing("the document has more than one pair of bench markers")
    head = document[: begin + len(BEGIN_MARKER)]
    tail = document[end:]
    return f"{head}\n{generated.strip()}\n{tail}"
