"""The circuit breaker and the provider guard, with a fake clock and a fake provider."""

from __future__ import annotations

import asyncio

import pytest

from write_service.saga.breaker import BreakerState, CircuitBreaker, CircuitOpen
from write_service.saga.provider import (
    AuthorizeResult,
    GuardedProvider,
    PaymentInfo,
    ProviderRefused,
    RefundResult,
    TransientProviderError,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_only() -> None:
    clock = Clock()
    breaker = CircuitBreaker(3, 5.0, clock)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # resets the streak
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == BreakerState.CLOSED
    breaker.before_call()
    breaker.record_failure()
    assert str(breaker.state.value) == "open"
    with pytest.raises(CircuitOpen) as raised:
        breaker.before_call()
    assert raised.value.retry_in_s == pytest.approx(5.0)


def test_half_open_lets_one_probe_through_and_its_success_closes() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 5.0, clock)
    breaker.record_failure()
    clock.now += 4.9
    with pytest.raises(CircuitOpen):
        breaker.before_call()
    clock.now += 0.2
    assert breaker.state == BreakerState.HALF_OPEN
    breaker.before_call()  # the probe
    with pytest.raises(CircuitOpen):
        breaker.before_call()  # a second caller while the probe runs
    breaker.record_success()
    assert str(breaker.state.value) == "closed"
    breaker.before_call()


def test_failed_probe_reopens_for_a_full_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker(2, 5.0, clock)
    breaker.record_failure()
    breaker.record_failure()
    clock.now += 5.0
    breaker.before_call()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert breaker.opened_count == 2
    clock.now += 4.0
    with pytest.raises(CircuitOpen):
        breaker.before_call()


def test_abandoned_probe_frees_the_slot() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 1.0, clock)
    breaker.record_failure()
    clock.now += 1.0
    breaker.before_call()
    breaker.record_abandoned()
    breaker.before_call()


class ScriptedProvider:
    """A provider whose answers are a script of results or exceptions."""

    def __init__(self, *script: object) -> None:
        self.script = list(script)
        self.calls = 0

    async def _next(self) -> object:
        self.calls += 1
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    async def authorize(
        self, reference: str, amount_minor: int, currency_code: str, customer_id: str, idempotency_key: str
    ) -> AuthorizeResult:
        result = await self._next()
        assert isinstance(result, AuthorizeResult)
        return result

    async def capture(self, reference: str, idempotency_key: str) -> PaymentInfo:
        result = await self._next()
        assert isinstance(result, PaymentInfo)
        return result

    async def void(self, reference: str, idempotency_key: str) -> PaymentInfo:
        result = await self._next()
        assert isinstance(result, PaymentInfo)
        return result

    async def refund(self, reference: str, idempotency_key: str) -> RefundResult:
        result = await self._next()
        assert isinstance(result, RefundResult)
        return result

    async def get_payment(self, reference: str) -> PaymentInfo | None:
        result = await self._next()
        assert result is None or isinstance(result, PaymentInfo)
        return result


APPROVED = AuthorizeResult(True, "auth-1", "")


async def test_guard_counts_transient_failures_and_fails_fast_when_open() -> None:
    clock = Clock()
    inner = ScriptedProvider(TransientProviderError("down"), TransientProviderError("down"), APPROVED)
    guarded = GuardedProvider(inner, CircuitBreaker(2, 3.0, clock))
    for _ in range(2):
        with pytest.raises(TransientProviderError):
            await guarded.authorize("r", 100, "EUR", "c", "k")
    with pytest.raises(CircuitOpen):
        await guarded.authorize("r", 100, "EUR", "c", "k")
    assert inner.calls == 2  # the open breaker never reached the provider
    clock.now += 3.0
    assert await guarded.authorize("r", 100, "EUR", "c", "k") == APPROVED
    assert guarded.breaker.state is BreakerState.CLOSED


async def test_guard_treats_a_refusal_as_proof_of_life() -> None:
    inner = ScriptedProvider(TransientProviderError("down"), ProviderRefused("no", "FAILED_PRECONDITION"))
    guarded = GuardedProvider(inner, CircuitBreaker(2, 3.0, Clock()))
    with pytest.raises(TransientProviderError):
        await guarded.capture("r", "k")
    with pytest.raises(ProviderRefused):
        await guarded.capture("r", "k")
    assert guarded.breaker.state is BreakerState.CLOSED
    assert guarded.breaker._failures == 0


async def test_guard_frees_the_probe_when_cancelled() -> None:
    clock = Clock()
    inner = ScriptedProvider(TransientProviderError("down"), asyncio.CancelledError(), None)
    guarded = GuardedProvider(inner, CircuitBreaker(1, 1.0, clock))
    with pytest.raises(TransientProviderError):
        await guarded.get_payment("r")
    clock.now += 1.0
    with pytest.raises(asyncio.CancelledError):
        await guarded.get_payment("r")
    assert await guarded.get_payment("r") is None
