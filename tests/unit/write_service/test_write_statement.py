"""How a unit of work's steps become one statement (write_service.adapters.pg_calls)."""

from __future__ import annotations

import asyncpg

from shared_kernel.contracts import errors
from write_service.adapters.pg_calls import Step, compose, write_error


def test_steps_are_renumbered_in_order_with_guards_and_unlocks_last() -> None:
    sql, args = compose(
        [
            Step("UPDATE t SET a = $2 WHERE id = $1 AND v = $3 RETURNING 1", (1, "x", 7), expect_rows=1),
            Step("INSERT INTO u VALUES ($1, $2)", ("p", "q"), name="log"),
        ],
        unlock=[42],
    )
    assert args == [1, "x", 7, "write-guard:0", "p", "q", [42]]
    assert "step_0 AS (\nUPDATE t SET a = $2 WHERE id = $1 AND v = $3 RETURNING 1\n)" in sql
    assert "log AS (\nINSERT INTO u VALUES ($5, $6)\n)" in sql
    assert "(SELECT count(*) FROM step_0) = 1 THEN 'true' ELSE $4::text END" in sql
    assert sql.endswith("unnest($7::bigint[]) AS k)")


def test_the_same_steps_give_the_same_text_whatever_their_values() -> None:
    first, _ = compose([Step("INSERT INTO u VALUES ($1)", ("a",))])
    second, _ = compose([Step("INSERT INTO u VALUES ($1)", ("b",))])
    assert first == second == "WITH step_0 AS (\nINSERT INTO u VALUES ($1)\n)\nSELECT true"


def test_a_failed_guard_is_the_conflict_its_step_names() -> None:
    steps = [Step("SELECT 1", expect_rows=1, conflict="row moved"), Step("SELECT 2", expect_rows=1, conflict="gone")]
    exc = asyncpg.InvalidTextRepresentationError('invalid input syntax for type boolean: "write-guard:1"')
    translated = write_error(exc, steps)
    assert isinstance(translated, errors.Conflict)
    assert translated.message == "gone"
    other = asyncpg.InvalidTextRepresentationError('invalid input syntax for type boolean: "yes please"')
    assert write_error(other, steps) is None
