"""The payment state machine and idempotency of the provider's ledger (real SQLite, in memory or a file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from payment_provider.commands import AuthorizeCommand, PaymentCommand
from payment_provider.ledger import Ledger
from shared_kernel.contracts.errors import FailedPrecondition, InvalidArgument, NotFound
from tessera.common.v1.money_pb2 import Money
from tessera.payments.v1 import payment_provider_pb2 as pb


@pytest.fixture
def ledger():
    books = Ledger(":memory:")
    yield books
    books.close()


def authorize(
    ledger: Ledger, reference: str = "order-1", key: str = "auth-1", amount: int = 1000, decline: str | None = None
) -> pb.AuthorizeResponse:
    request = pb.AuthorizeRequest(
        reference=reference,
        amount=Money(currency_code="EUR", amount_minor=amount),
        customer_id="customer-1",
        idempotency_key=key,
    )
    result = ledger.authorize(AuthorizeCommand.from_proto(request), request, decline)
    return pb.AuthorizeResponse.FromString(result.response)


def capture(ledger: Ledger, reference: str = "order-1", key: str = "capture-1") -> pb.CaptureResponse:
    request = pb.CaptureRequest(reference=reference, idempotency_key=key)
    return pb.CaptureResponse.FromString(ledger.capture(PaymentCommand.from_proto(request), request).response)


def void(ledger: Ledger, reference: str = "order-1", key: str = "void-1") -> pb.VoidResponse:
    request = pb.VoidRequest(reference=reference, idempotency_key=key)
    return pb.VoidResponse.FromString(ledger.void(PaymentCommand.from_proto(request), request).response)


def refund(ledger: Ledger, reference: str = "order-1", key: str = "refund-1") -> pb.RefundResponse:
    request = pb.RefundRequest(reference=reference, idempotency_key=key)
    return pb.RefundResponse.FromString(ledger.refund(PaymentCommand.from_proto(request), request).response)


def test_authorize_capture_refund(ledger: Ledger):
    reply = authorize(ledger)
    assert reply.approved
    assert reply.authorization_id.startswith("auth_")
    assert reply.payment.state == pb.PAYMENT_STATE_AUTHORIZED
    assert reply.payment.amount == Money(currency_code="EUR", amount_minor=1000)
    assert capture(ledger).payment.state == pb.PAYMENT_STATE_CAPTURED
    refunded = refund(ledger)
    assert refunded.refund_id.startswith("refund_")
    payment = ledger.get("order-1")
    assert payment.state == pb.PAYMENT_STATE_REFUNDED
    assert (payment.captures, payment.refunds) == (1, 1)
    assert payment.updated_at.ToMicroseconds() >= payment.created_at.ToMicroseconds()


def test_decline_is_a_reply_and_may_be_retried_with_a_new_key(ledger: Ledger):
    declined = authorize(ledger, decline="declined: insufficient funds")
    assert not declined.approved
    assert declined.decline_reason == "declined: insufficient funds"
    assert declined.authorization_id == ""
    assert declined.payment.state == pb.PAYMENT_STATE_DECLINED
    with pytest.raises(FailedPrecondition, match="declined"):
        capture(ledger)
    approved = authorize(ledger, key="auth-2")
    assert approved.approved
    assert ledger.get("order-1").state == pb.PAYMENT_STATE_AUTHORIZED


def test_same_key_returns_the_first_reply_byte_for_byte_without_a_second_effect(ledger: Ledger):
    request = pb.AuthorizeRequest(
        reference="order-1", amount=Money(currency_code="EUR", amount_minor=1000), customer_id="c", idempotency_key="k"
    )
    command = AuthorizeCommand.from_proto(request)
    first = ledger.authorize(command, request, None)
    # A decline decided for the retry is ignored: the stored answer stands.
    again = ledger.authorize(command, request, "declined: would have been")
    assert first.outcome == "approved"
    assert again.replayed
    assert again.response == first.response
    capture(ledger)
    assert capture(ledger) == capture(ledger)
    assert ledger.get("order-1").captures == 1
    assert len(ledger.list()) == 1


def test_same_key_with_another_request_is_invalid_argument(ledger: Ledger):
    authorize(ledger, key="shared")
    with pytest.raises(InvalidArgument) as raised:
        authorize(ledger, reference="order-2", key="shared")
    assert [v.field for v in raised.value.violations] == ["idempotency_key"]
    with pytest.raises(InvalidArgument, match="idempotency_key"):
        capture(ledger, key="shared")  # same key, another method
    with pytest.raises(NotFound):
        ledger.get("order-2")


def test_second_authorization_of_a_reference_is_refused(ledger: Ledger):
    authorize(ledger)
    with pytest.raises(FailedPrecondition, match="one authorization per reference"):
        authorize(ledger, key="auth-2")


def test_void_releases_an_authorization(ledger: Ledger):
    authorize(ledger)
    assert void(ledger).payment.state == pb.PAYMENT_STATE_VOIDED
    with pytest.raises(FailedPrecondition, match="voided"):
        capture(ledger)
    with pytest.raises(FailedPrecondition, match="voided"):
        refund(ledger)
    # Voiding again (a compensation that is retried with a new key) is harmless.
    assert void(ledger, key="void-2").payment.state == pb.PAYMENT_STATE_VOIDED
    assert ledger.get("order-1").captures == 0


def test_void_before_authorize_blocks_later_authorizations(ledger: Ledger):
    voided = void(ledger, reference="order-9")
    assert voided.payment.state == pb.PAYMENT_STATE_VOIDED
    assert not voided.payment.HasField("amount")
    with pytest.raises(FailedPrecondition, match="a voided reference cannot be authorized"):
        authorize(ledger, reference="order-9")
    assert ledger.get("order-9").state == pb.PAYMENT_STATE_VOIDED


@pytest.mark.parametrize(
    ("setup", "operation", "rule"),
    [
        ("authorized", capture, None),
        ("authorized", refund, "only a payment that is captured can be refunded"),
        ("captured", capture, "only a payment that is authorized can be captured"),
        ("captured", void, "only a payment that is authorized or declined can be voided"),
        ("refunded", refund, "only a payment that is captured can be refunded"),
        ("refunded", void, "only a payment that is authorized or declined can be voided"),
        ("refunded", capture, "only a payment that is authorized can be captured"),
    ],
)
def test_illegal_transitions_name_the_rule(ledger: Ledger, setup, operation, rule):
    authorize(ledger)
    if setup in ("captured", "refunded"):
        capture(ledger, key="setup-capture")
    if setup == "refunded":
        refund(ledger, key="setup-refund")
    if rule is None:
        operation(ledger, key="legal")
        return
    before = ledger.get("order-1")
    with pytest.raises(FailedPrecondition, match=rule):
        operation(ledger, key="illegal")
    assert ledger.get("order-1") == before


@pytest.mark.parametrize("operation", [capture, refund])
def test_unknown_reference_is_not_found(ledger: Ledger, operation):
    with pytest.raises(NotFound, match="no payment with reference 'nope'"):
        operation(ledger, reference="nope")


def test_a_failed_call_stores_nothing_under_its_key(ledger: Ledger):
    with pytest.raises(NotFound):
        capture(ledger, key="early")
    authorize(ledger)
    # The same key, retried after the payment exists, is judged afresh.
    assert capture(ledger, key="early").payment.captures == 1


def test_payments_survive_reopening_the_file(tmp_path: Path):
    path = str(tmp_path / "provider.sqlite3")
    first = Ledger(path)
    authorize(first)
    capture(first)
    first.close()
    second = Ledger(path)
    try:
        payment = second.get("order-1")
        assert (payment.state, payment.captures) == (pb.PAYMENT_STATE_CAPTURED, 1)
        # The idempotency records survive too: the retried capture is replayed, not charged again.
        assert capture(second).payment.captures == 1
        assert second.get("order-1").captures == 1
    finally:
        second.close()


def test_list_is_oldest_first(ledger: Ledger):
    for index in range(3):
        authorize(ledger, reference=f"order-{index}", key=f"key-{index}")
    assert [p.reference for p in ledger.list()] == ["order-0", "order-1", "order-2"]
