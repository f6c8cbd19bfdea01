"""The bench table: goals and ratios, text and markdown rendering, and the rewrite of BENCHMARKS.md."""

from __future__ import annotations

import pytest

from perf.bench.table import (
    BEGIN_MARKER,
    END_MARKER,
    NOT_MEASURED,
    Goal,
    MarkersMissing,
    Row,
    cells,
    format_number,
    not_measured,
    render_markdown,
    render_text,
    replace_between_markers,
)


def _row(**overrides: object) -> Row:
    row = Row(key="write", figure="writes/s", unit="/s", goal=Goal("ratio", ">=", 0.5), how="grpc clients")
    for name, value in overrides.items():
        setattr(row, name, value)
    return row


def test_ratio_is_value_over_ceiling() -> None:
    assert _row(value=450.0, ceiling=900.0).ratio == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("value", "ceiling"),
    [(None, 900.0), (450.0, None), (450.0, 0.0)],
)
def test_no_ratio_without_both_figures(value: float | None, ceiling: float | None) -> None:
    assert _row(value=value, ceiling=ceiling).ratio is None


@pytest.mark.parametrize(
    ("goal", "value", "ceiling", "met"),
    [
        (Goal("ratio", ">=", 0.5), 450.0, 900.0, True),  # exactly on the goal
        (Goal("ratio", ">=", 0.5), 440.0, 900.0, False),
        (Goal("ratio", ">=", 0.5), 439.98, 880.0, True),  # 0.49998 shows as 0.50 and is judged as shown
        (Goal("ratio", ">=", 0.5), 435.0, 880.0, False),  # 0.494 shows as 0.49
        (Goal("ratio", "<=", 1.05), 105.0, 100.0, True),
        (Goal("ratio", "<=", 1.05), 106.0, 100.0, False),
        (Goal("value", ">=", 20_000), 19_999.0, None, False),
        (Goal("value", ">=", 20_000), 25_000.0, None, True),
        (Goal("value", "<=", 10.0), 9.5, None, True),
        (Goal("value", "<=", 10.0), 10.5, None, False),
        (Goal("ratio", ">=", 0.5), 450.0, None, None),  # a ratio goal without a ceiling cannot be judged
    ],
)
def test_goal_evaluation(goal: Goal, value: float, ceiling: float | None, met: bool | None) -> None:
    assert _row(goal=goal, value=value, ceiling=ceiling).met is met


def test_a_row_without_goal_is_neither_met_nor_missed() -> None:
    assert _row(goal=None, value=1.0).met is None


def test_failed_row_drops_its_figures_and_says_why() -> None:
    row = _row(value=450.0, ceiling=900.0).fail("the tool is missing")
    assert (row.value, row.ceiling, row.ratio, row.met) == (None, None, None, None)
    text = cells(row)
    assert text[1] == f"{NOT_MEASURED}: the tool is missing"
    assert text[5] == NOT_MEASURED


def test_not_measured_marks_every_row() -> None:
    rows = not_measured([_row(), _row(figure="other")], "boom")
    assert [row.error for row in rows] == ["boom", "boom"]


@pytest.mark.parametrize(
    ("value", "text"),
    [(23_456.7, "23,457"), (512.4, "512"), (37.14, "37.1"), (3.2, "3.2"), (3.0, "3"), (0.874, "0.87"), (0.0, "0.00")],
)
def test_format_number(value: float, text: str) -> None:
    assert format_number(value) == text


def test_goal_descriptions() -> None:
    assert Goal("ratio", ">=", 0.85).describe() == "ratio ≥ 0.85"
    assert Goal("value", "<=", 10, "ms").describe() == "≤ 10 ms"
    assert Goal("value", ">=", 20_000, "events/s").describe() == "≥ 20,000 events/s"


def test_cells_of_a_measured_row() -> None:
    row = _row(value=450.0, ceiling=900.0, ceiling_label="bare asyncpg")
    assert cells(row) == ["writes/s", "450 /s", "900 /s (bare asyncpg)", "0.50", "ratio ≥ 0.5", "yes", "grpc clients"]
    assert cells(_row(value=400.0, ceiling=900.0))[5] == "NO"
    assert cells(_row(value=1.0, ceiling=2.0, ceiling_unit="hashes/s"))[2] == "2 hashes/s"


def test_text_table_is_aligned_and_lists_notes() -> None:
    rows = [
        _row(value=450.0, ceiling=900.0, notes=["p99 12 ms"]),
        _row(figure="a much longer figure name", value=1.0, ceiling=4.0),
    ]
    lines = render_text(rows).splitlines()
    header, rule, first, second = lines[:4]
    # Every column starts at the same offset on every line.
    starts = [index for index, char in enumerate(rule) if char == "-" and (index == 0 or rule[index - 1] == " ")]
    for line in (header, first, second):
        for start in starts[1:]:
            assert line[start - 2 : start] == "  "
            assert line[start] != " "
    assert "- writes/s: p99 12 ms" in lines


def test_markdown_table_escapes_pipes_and_keeps_header() -> None:
    rows = [_row(value=450.0, ceiling=900.0, how="a | b")]
    text = render_markdown(rows, ["Measured somewhere."])
    lines = text.splitlines()
    assert lines[0] == "Measured somewhere."
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 3  # header, alignment, one row
    assert "a \\| b" in table[2]
    assert all(line.count(" | ") + 2 == table[0].count("|") for line in table[:1])


DOCUMENT = f"""# Benchmarks

Hand-written intro.

{BEGIN_MARKER}
_Not measured yet._
{END_MARKER}

## Hot-path changes

Kept as written.
"""


def test_replace_between_markers_keeps_everything_outside() -> None:
    updated = replace_between_markers(DOCUMENT, "| new | table |\n")
    before, _, rest = updated.partition(BEGIN_MARKER)
    inside, _, after = rest.partition(END_MARKER)
    assert before == DOCUMENT.partition(BEGIN_MARKER)[0]
    assert after == DOCUMENT.partition(END_MARKER)[2]
    assert inside == "\n| new | table |\n"
    assert "_Not measured yet._" not in updated


def test_replace_between_markers_is_repeatable() -> None:
    once = replace_between_markers(DOCUMENT, "first")
    twice = replace_between_markers(once, "second")
    assert twice == replace_between_markers(DOCUMENT, "second")


@pytest.mark.parametrize(
    "document",
    [
        "no markers at all",
        f"{END_MARKER}\n{BEGIN_MARKER}\n",
        f"{BEGIN_MARKER}\n{END_MARKER}\n{BEGIN_MARKER}\n{END_MARKER}\n",
        f"{BEGIN_MARKER} only the beginning",
    ],
)
def test_replace_between_markers_refuses_bad_documents(document: str) -> None:
    with pytest.raises(MarkersMissing):
        replace_between_markers(document, "x")
