"""The payment provider as the saga sees it: a small port, its gRPC adapter and a breaker guard.

Errors are sorted once, here: `TransientProviderError` (unreachable, too slow, overloaded:
retry later) and `ProviderRefused` (the provider answered and said no: retrying the same
request cannot help). A decline is neither; it is an answer (`approved=False`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc

from tessera.common.v1.money_pb2 import Money
from tessera.payments.v1 import payment_provider_pb2 as pb
from tessera.payments.v1 import payment_provider_pb2_grpc as pb_grpc
from write_service.saga.breaker import CircuitBreaker

T = TypeVar("T")

# Codes that are an answer about the request itself; anything else may pass on retry.
_REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)

PAYMENT_STATES = {
    pb.PAYMENT_STATE_AUTHORIZED: "authorized",
    pb.PAYMENT_STATE_CAPTURED: "captured",
    pb.PAYMENT_STATE_VOIDED: "voided",
    pb.PAYMENT_STATE_REFUNDED: "refunded",
    pb.PAYMENT_STATE_DECLINED: "declined",
}


class ProviderError(Exception):
    """A provider call did not succeed."""


class TransientProviderError(ProviderError):
    """The provider could not be reached or did not answer in time; a retry may succeed."""


class ProviderRefused(ProviderError):
    """The provider answered with an error about the request; retrying it cannot help."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class PaymentNotFound(ProviderRefused):
    """The provider has no payment for the reference."""


@dataclass(frozen=True, slots=True)
class PaymentInfo:
    """One payment as the provider reports it."""

    reference: str
    authorization_id: str
    state: str  # authorized | captured | voided | refunded | declined | unknown
    amount_minor: int
    currency_code: str
    captures: int
    refunds: int


@dataclass(frozen=True, slots=True)
class AuthorizeResult:
    """The answer to an authorization: approved with an id, or declined with a reason."""

    approved: bool
    authorization_id: str
    decline_reason: str


@dataclass(frozen=True, slots=True)
class RefundResult:
    """The provider's id of the refund and the payment after it."""

    refund_id: str
    payment: PaymentInfo


class PaymentProvider(Protocol):
    """What the saga asks of a payment provider; every state change carries an idempotency key."""

    async def authorize(
        self, reference: str, amount_minor: int, currency_code: str, customer_id: str, idempotency_key: str
    ) -> AuthorizeResult:
        """Hold the amount; a decline is an answer, not an error."""
        ...

    async def capture(self, reference: str, idempotency_key: str) -> PaymentInfo:
        """Charge the authorized payment."""
        ...

    async def void(self, reference: str, idempotency_key: str) -> PaymentInfo:
        """Release the authorization (or block a reference never authorized)."""
        ...

    async def refund(self, reference: str, idempotency_key: str) -> RefundResult:
        """Return a captured payment."""
        ...

    async def get_payment(self, reference: str) -> PaymentInfo | None:
        """The payment for the reference, or None when the provider has none."""
        ...


def payment_from_pb(payment: pb.Payment) -> PaymentInfo:
    """The port's view of a provider Payment message."""
    return PaymentInfo(
        reference=payment.reference,
        authorization_id=payment.authorization_id,
        state=PAYMENT_STATES.get(payment.state, "unknown"),
        amount_minor=payment.amount.amount_minor,
        currency_code=payment.amount.currency_code,
        captures=payment.captures,
        refunds=payment.refunds,
    )


def _translate(exc: grpc.aio.AioRpcError) -> ProviderError:
    code = exc.code()
    message = f"payment provider answered {code.name}: {exc.details() or ''}".rstrip(": ")
    if code == grpc.StatusCode.NOT_FOUND:
        return PaymentNotFound(message, code.name)
    if code in _REFUSALS:
        return ProviderRefused(message, code.name)
    return TransientProviderError(message)


class GrpcPaymentProvider:
    """PaymentProviderService over a channel the composition root opened; every call has a deadline."""

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self._stub = pb_grpc.PaymentProviderServiceStub(channel)
        self._timeout_s = timeout_s
        self._metadata = metadata

    async def _call(self, method: Callable[..., Awaitable[T]], request: object) -> T:
        """One call with the deadline and metadata; a failure as the port's error."""
        try:
            return await method(request, timeout=self._timeout_s, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc) from exc

    async def authorize(
        self, reference: str, amount_minor: int, currency_code: str, customer_id: str, idempotency_key: str
    ) -> AuthorizeResult:
        """Authorize(reference, amount, customer, key)."""
        request = pb.AuthorizeRequest(
            reference=reference,
            amount=Money(currency_code=currency_code, amount_minor=amount_minor),
            customer_id=customer_id,
            idempotency_key=idempotency_key,
        )
        reply: pb.AuthorizeResponse = await self._call(self._stub.Authorize, request)
        return AuthorizeResult(reply.approved, reply.authorization_id, reply.decline_reason)

    async def capture(self, reference: str, idempotency_key: str) -> PaymentInfo:
        """Capture(reference, key)."""
        request = pb.CaptureRequest(reference=reference, idempotency_key=idempotency_key)
        reply: pb.CaptureResponse = await self._call(self._stub.Capture, request)
        return payment_from_pb(reply.payment)

    async def void(self, reference: str, idempotency_key: str) -> PaymentInfo:
        """Void(reference, key)."""
        request = pb.VoidRequest(reference=reference, idempotency_key=idempotency_key)
        reply: pb.VoidResponse = await self._call(self._stub.Void, request)
        return payment_from_pb(reply.payment)

    async def refund(self, reference: str, idempotency_key: str) -> RefundResult:
        """Refund(reference, key)."""
        request = pb.RefundRequest(reference=reference, idempotency_key=idempotency_key)
        reply: pb.RefundResponse = await self._call(self._stub.Refund, request)
        return RefundResult(reply.refund_id, payment_from_pb(reply.payment))

    async def get_payment(self, reference: str) -> PaymentInfo | None:
        """GetPayment(reference); NOT_FOUND is None."""
        try:
            reply: pb.GetPaymentResponse = await self._call(
                self._stub.GetPayment, pb.GetPaymentRequest(reference=reference)
            )
        except PaymentNotFound:
            return None
        return payment_from_pb(reply.payment)


class GuardedProvider:
    """Wraps a provider in a circuit breaker: an open breaker fails calls fast with CircuitOpen."""

    def __init__(self, inner: PaymentProvider, breaker: CircuitBreaker) -> None:
        self.inner = inner
        self.breaker = breaker

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        self.breaker.before_call()
        try:
            result = await call()
        except TransientProviderError:
            self.breaker.record_failure()
            raise
        except ProviderRefused:
            self.breaker.record_success()
            raise
        except (asyncio.CancelledError, Exception):
            self.breaker.record_abandoned()
            raise
        self.breaker.record_success()
        return result

    async def authorize(
        self, reference: str, amount_minor: int, currency_code: str, customer_id: str, idempotency_key: str
    ) -> AuthorizeResult:
        """Authorize through the breaker."""
        return await self._call(
            lambda: self.inner.authorize(reference, amount_minor, currency_code, customer_id, idempotency_key)
        )

    async def capture(self, reference: str, idempotency_key: str) -> PaymentInfo:
        """Capture through the breaker."""
        return await self._call(lambda: self.inner.capture(reference, idempotency_key))

    async def void(self, reference: str, idempotency_key: str) -> PaymentInfo:
        """Void through the breaker."""
        return await self._call(lambda: self.inner.void(reference, idempotency_key))

    async def refund(self, reference: str, idempotency_key: str) -> RefundResult:
        """Refund through the breaker."""
        return await self._call(lambda: self.inner.refund(reference, idempotency_key))

    async def get_payment(self, reference: str) -> PaymentInfo | None:
        """GetPayment through the breaker."""
        return await self._call(lambda: self.inner.get_payment(reference))
