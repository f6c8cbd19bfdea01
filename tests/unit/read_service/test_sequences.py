"""Projecting through parked sequences: a poison event parks its sequence, later events of it are held."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from read_service.applier import project_run
from read_service.keys import OrderKeys
from read_service.projections.base import PoisonEvent
from read_service.projections.orders import OrdersProjection
from read_service.published import PublishedState
from read_service.sequences import ParkedSequences, sequence_of

from .order_events import Events, envelope

PARKED = "t:orders:parked"


async def _never(_envelope: Any, _exc: BaseException) -> bool:
    return False


def _story() -> tuple[Events, str, str, list[Any]]:
    ev = Events()
    customer = str(uuid.uuid4())
    anvil, added = ev.add_product("ABC-1", "Anvil", 1999, 100)
    o1, placed1 = ev.place(customer, [(anvil, 1)])
    o2, placed2 = ev.place(customer, [(anvil, 2)])
    log = [added, placed1, placed2, *ev.reserve(o1), ev.authorize(o1), *ev.reserve(o2), ev.authorize(o2)]
    return ev, o1, o2, [envelope(event, position) for position, event in enumerate(log, start=1)]


async def test_a_poison_event_parks_its_order_and_holds_the_orders_later_events_even_of_other_aggregates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, o1, o2, run = _story()
    projection = OrdersProjection(OrderKeys("t:"))
    real = OrdersProjection.project

    def poisoned(self: OrdersProjection, env: Any, state: Any) -> Any:
        if env.position == 2:  # o1's OrderPlaced
            raise PoisonEvent("bad bytes")
        return real(self, env, state)

    monkeypatch.setattr(OrdersProjection, "project", poisoned)
    sequences = ParkedSequences(PARKED, projection, "", {})
    projected = await project_run(projection, run, {}, skipped=_never, sequences=sequences)

    # Nothing stops the run: every event has an effect, in order.
    assert [e.position for e, _ in projected.effects] == [1, 2, 3, 4, 5, 6, 7]
    assert projected.poison is None and list(projected.errors) == [2]
    effects = dict((e.position, effect) for e, effect in projected.effects)
    # The poison event and o1's later events (its StockReserved is the product's) only touch the record.
    for position in (2, 4, 5):
        assert [op[:3] for op in effects[position].ops] == [("HSET", PARKED, f"order/{o1}")]
    record = json.loads(str(effects[5].ops[-1][3]))
    assert (record["position"], record["held"], record["last_position"]) == (2, 2, 5)
    assert "PoisonEvent: bad bytes" in record["error"]
    # o2 is projected as usual.
    assert any(op[0] == "SET" for op in effects[3].ops)
    assert all(op[1] != PARKED for position in (6, 7) for op in effects[position].ops)
    assert [r.position for r in sequences.parked] == [2]
    assert sequence_of(projection, run[5]) == f"order/{o2}"


async def test_without_sequences_the_run_stops_at_the_poison_event(monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, _, run = _story()
    projection = OrdersProjection(OrderKeys("t:"))
    real = OrdersProjection.project

    def poisoned(self: OrdersProjection, env: Any, state: Any) -> Any:
        if env.position == 2:
            raise PoisonEvent("bad bytes")
        return real(self, env, state)

    monkeypatch.setattr(OrdersProjection, "project", poisoned)
    projected = await project_run(projection, run, {}, skipped=_never)
    assert [e.position for e, _ in projected.effects] == [1]
    assert projected.poison is not None and projected.poison.position == 2


def test_published_state_marks_only_the_parked_aggregate() -> None:
    state = PublishedState("orders", lambda: None)  # type: ignore[arg-type, return-value]
    _, o1, o2, run = _story()
    projection = OrdersProjection(OrderKeys("t:"))
    sequences = ParkedSequences(PARKED, projection, "", {})
    sequences.park(run[4], PoisonEvent("bad"))
    state.publish_parked_aggregates(sequences.records)
    assert state.parked_position(o1) == 5
    assert state.parked_position(o2) is None
    assert state.parked_position() is None
