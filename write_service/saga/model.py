"""The saga's state machine as plain data and functions, free of I/O.

Statuses: running → completed, running → compensating → completed, and any active status →
failed (parked after too many attempts) → back to its active status by an operator's retry.

Steps:
    running       reserve_stock → authorize_payment → capture_and_confirm
    compensating  compensate (the entry CancelOrder sets) = release_stock → settle_payment
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

from write_service.saga.backoff import backoff_delay_s

SAGA_TYPE = "place_order"

RUNNING = "running"
COMPENSATING = "compensating"
COMPLETED = "completed"
FAILED = "failed"
ACTIVE_STATUSES = (RUNNING, COMPENSATING)

RESERVE_STOCK = "reserve_stock"
AUTHORIZE_PAYMENT = "authorize_payment"
CAPTURE_AND_CONFIRM = "capture_and_confirm"
FORWARD_STEPS = (RESERVE_STOCK, AUTHORIZE_PAYMENT, CAPTURE_AND_CONFIRM)

COMPENSATE = "compensate"
RELEASE_STOCK = "release_stock"
SETTLE_PAYMENT = "settle_payment"
COMPENSATION_STEPS = (COMPENSATE, RELEASE_STOCK, SETTLE_PAYMENT)

StepKind = Literal["act", "compensate"]
Settlement = Literal["void", "refund", "none"]


class UnknownStep(Exception):
    """The execution row names a status/step pair this worker does not know."""


@dataclass(frozen=True, slots=True)
class SagaRow:
    """One saga execution as a worker holds it."""

    id: Any  # uuid.UUID
    order_id: Any  # uuid.UUID
    status: str
    current_step: str
    context: dict[str, Any]
    version: int
    attempts: int
    locked_by: str | None


def step_to_run(status: str, current_step: str) -> str:
    """The step a worker runs next for a saga in `status` at `current_step`."""
    if status == RUNNING and current_step in FORWARD_STEPS:
        return current_step
    if status == COMPENSATING and current_step in COMPENSATION_STEPS:
        return RELEASE_STOCK if current_step == COMPENSATE else current_step
    raise UnknownStep(f"no step to run for status {status!r} at step {current_step!r}")


def step_kind(step: str) -> StepKind:
    """ "act" for a forward step, "compensate" for an undo step."""
    return "compensate" if step in COMPENSATION_STEPS else "act"


def status_for_retry(current_step: str) -> str:
    """The active status an operator's retry puts a failed saga back into."""
    return COMPENSATING if current_step in COMPENSATION_STEPS else RUNNING


def settlement_for(payment_state: str | None) -> Settlement:
    """What compensation does with the provider's payment for the order.

    No payment at all is voided too: the void blocks an authorization that may still be on its
    way (a call that timed out on our side but reaches the provider later). A payment already
    voided or refunded is settled again with the same idempotency key: the provider replays
    its first reply, and the saga records the event it could not record when that call's
    answer was lost (a timeout that took effect, a crash, a re-plan).
    """
    if payment_state is None or payment_state in ("authorized", "voided"):
        return "void"
    if payment_state in ("captured", "refunded"):
        return "refund"
    return "none"


def idempotency_key(saga_id: object, operation: str) -> str:
    """The provider idempotency key of one operation of one saga: a retry never acts twice."""
    return f"saga-{saga_id}-{operation}"


@dataclass(frozen=True, slots=True)
class FailurePlan:
    """What a failed attempt leads to: a retry after `delay_s`, or parking the saga."""

    attempts: int
    park: bool
    delay_s: float


def plan_failure(
    attempts_so_far: int, max_attempts: int, base_ms: int, cap_ms: int, rng: random.Random | None = None
) -> FailurePlan:
    """Count the failed attempt; park the saga once `max_attempts` attempts have failed."""
    attempts = attempts_so_far + 1
    if attempts >= max_attempts:
        return FailurePlan(attempts=attempts, park=True, delay_s=0.0)
    return FailurePlan(attempts=attempts, park=False, delay_s=backoff_delay_s(attempts, base_ms, cap_ms, rng))
