"""The saga's state machine, backoff and failure planning, without I/O."""

from __future__ import annotations

import random

import pytest

from write_service.domain.orders import shortage_reason
from write_service.saga import model
from write_service.saga.backoff import backoff_delay_s


@pytest.mark.parametrize(
    ("status", "current", "expected"),
    [
        ("running", "reserve_stock", "reserve_stock"),
        ("running", "authorize_payment", "authorize_payment"),
        ("running", "capture_and_confirm", "capture_and_confirm"),
        ("compensating", "compensate", "release_stock"),
        ("compensating", "release_stock", "release_stock"),
        ("compensating", "settle_payment", "settle_payment"),
    ],
)
def test_step_to_run(status: str, current: str, expected: str) -> None:
    assert model.step_to_run(status, current) == expected


@pytest.mark.parametrize(
    ("status", "current"),
    [
        ("completed", "capture_and_confirm"),
        ("failed", "authorize_payment"),
        ("running", "release_stock"),
        ("compensating", "authorize_payment"),
        ("running", "no_such_step"),
    ],
)
def test_no_step_for_inactive_or_mismatched_states(status: str, current: str) -> None:
    with pytest.raises(model.UnknownStep):
        model.step_to_run(status, current)


def test_kinds_and_retry_status() -> None:
    assert model.step_kind("authorize_payment") == "act"
    assert model.step_kind("settle_payment") == "compensate"
    assert model.status_for_retry("capture_and_confirm") == "running"
    assert model.status_for_retry("compensate") == "compensating"
    assert model.status_for_retry("settle_payment") == "compensating"


@pytest.mark.parametrize(
    ("state", "action"),
    [
        (None, "void"),  # never authorized: void anyway so a late authorization is refused
        ("authorized", "void"),
        ("captured", "refund"),
        ("voided", "void"),  # settled again with the same key: the provider replays, the event is recorded
        ("refunded", "refund"),
        ("declined", "none"),
    ],
)
def test_settlement(state: str | None, action: str) -> None:
    assert model.settlement_for(state) == action


def test_idempotency_keys_differ_by_operation_and_are_stable() -> None:
    assert model.idempotency_key("s1", "authorize") == model.idempotency_key("s1", "authorize")
    assert model.idempotency_key("s1", "authorize") != model.idempotency_key("s1", "capture")
    assert model.idempotency_key("s1", "authorize") != model.idempotency_key("s2", "authorize")


def test_backoff_grows_then_caps_and_stays_within_jitter() -> None:
    rng = random.Random(7)
    for attempt in range(1, 15):
        capped = min(5000, 100 * 2 ** (attempt - 1)) / 1000
        for _ in range(50):
            delay = backoff_delay_s(attempt, 100, 5000, rng)
            assert capped / 2 <= delay <= capped
    assert backoff_delay_s(60, 100, 5000, random.Random(1)) <= 5.0


def test_backoff_jitters() -> None:
    rng = random.Random(3)
    assert len({backoff_delay_s(4, 100, 5000, rng) for _ in range(20)}) > 10


def test_backoff_rejects_attempt_zero() -> None:
    with pytest.raises(ValueError, match="attempt"):
        backoff_delay_s(0, 100, 1000)


def test_plan_failure_retries_until_the_cap_then_parks() -> None:
    rng = random.Random(1)
    first = model.plan_failure(0, 3, 100, 1000, rng)
    assert (first.attempts, first.park) == (1, False)
    assert 0.05 <= first.delay_s <= 0.1
    second = model.plan_failure(1, 3, 100, 1000, rng)
    assert (second.attempts, second.park) == (2, False)
    third = model.plan_failure(2, 3, 100, 1000, rng)
    assert (third.attempts, third.park) == (3, True)


def test_shortage_reason_names_every_sku() -> None:
    reason = shortage_reason([("A-1", 3, 1), ("B-2", 5, 0)], ["C-3"])
    assert "A-1 (requested 3, available 1)" in reason
    assert "B-2 (requested 5, available 0)" in reason
    assert "discontinued product: C-3" in reason
    assert shortage_reason([], ["X", "Y"]) == "discontinued products: X, Y"
