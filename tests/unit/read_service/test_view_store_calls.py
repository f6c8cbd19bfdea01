"""How ViewStore.apply_many groups events into script calls: runs of no-op events become one call."""

from __future__ import annotations

from collections.abc import Sequence

from read_service.projections.base import Op
from read_service.view_store import ApplyResult, Outcome, _advance_results, _calls

SET: Sequence[Op] = [("SET", "k", "v")]


def test_consecutive_no_op_events_become_one_call_and_ops_stay_single() -> None:
    events: list[tuple[int, Sequence[Op]]] = [(1, []), (2, []), (3, SET), (4, []), (5, SET), (6, []), (7, []), (8, [])]

    assert _calls(events) == [(1, 2, ()), (3, 3, SET), (4, 4, ()), (5, 5, SET), (6, 8, ())]


def test_a_hole_in_the_positions_splits_a_run() -> None:
    assert _calls([(1, []), (2, []), (4, []), (5, [])]) == [(1, 2, ()), (4, 5, ())]


def test_run_results_match_per_event_outcomes() -> None:
    assert _advance_results(4, 6, 1) == [ApplyResult(Outcome.GAP, 1)] * 3
    assert _advance_results(4, 6, 4) == [
        ApplyResult(Outcome.DUPLICATE, 4),
        ApplyResult(Outcome.APPLIED, 5),
        ApplyResult(Outcome.APPLIED, 6),
    ]
    assert _advance_results(4, 6, 9) == [ApplyResult(Outcome.DUPLICATE, 9)] * 3
