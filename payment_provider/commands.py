"""Requests to the provider, validated with every violation reported at once (INVALID_ARGUMENT)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared_kernel.contracts.errors import FieldViolation, InvalidArgument, violations_from_pydantic
from shared_kernel.contracts.validation import has_control_chars
from tessera.payments.v1 import payment_provider_pb2 as pb

REFERENCE_MAX = 100
CUSTOMER_ID_MAX = 100
IDEMPOTENCY_KEY_MAX = 200


def _single_line(value: str) -> str:
    if has_control_chars(value):
        raise ValueError("must not contain control characters")
    if not value.strip():
        raise ValueError("must not be blank")
    return value


Reference = Annotated[str, Field(min_length=1, max_length=REFERENCE_MAX), AfterValidator(_single_line)]
CustomerId = Annotated[str, Field(min_length=1, max_length=CUSTOMER_ID_MAX), AfterValidator(_single_line)]
IdempotencyKey = Annotated[str, Field(min_length=1, max_length=IDEMPOTENCY_KEY_MAX), AfterValidator(_single_line)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    @classmethod
    def parse(cls, fields: Mapping[str, object], extra: Sequence[FieldViolation] = ()) -> Self:
        """Validate `fields`; report every violation (plus `extra`) at once."""
        violations = list(extra)
        try:
            parsed = cls.model_validate(dict(fields))
        except ValidationError as exc:
            details = exc.errors(include_url=False, include_input=False, include_context=False)
            violations.extend(violations_from_pydantic(dict(d) for d in details))
        else:
            if not violations:
                return parsed
        raise InvalidArgument(violations) from None


class Amount(_Model):
    """A positive amount in minor units of an ISO 4217 currency."""

    currency_code: str = Field(pattern=r"^[A-Z]{3}$")
    amount_minor: int = Field(gt=0, le=2**63 - 1)


class AuthorizeCommand(_Model):
    """Hold `amount` for `reference`."""

    reference: Reference
    amount: Amount | None
    customer_id: CustomerId
    idempotency_key: IdempotencyKey

    @field_validator("amount")
    @classmethod
    def _amount_required(cls, value: Amount | None) -> Amount | None:
        if value is None:
            raise ValueError("is required")
        return value

    @property
    def money(self) -> Amount:
        """The amount (always present once parsed)."""
        assert self.amount is not None
        return self.amount

    @classmethod
    def from_proto(cls, request: pb.AuthorizeRequest) -> AuthorizeCommand:
        """Parse an AuthorizeRequest."""
        amount = (
            {"currency_code": request.amount.currency_code, "amount_minor": request.amount.amount_minor}
            if request.HasField("amount")
            else None
        )
        return cls.parse(
            {
                "reference": request.reference,
                "amount": amount,
                "customer_id": request.customer_id,
                "idempotency_key": request.idempotency_key,
            }
        )


class PaymentCommand(_Model):
    """Capture, void or refund the payment of `reference`."""

    reference: Reference
    idempotency_key: IdempotencyKey

    @classmethod
    def from_proto(cls, request: pb.CaptureRequest | pb.VoidRequest | pb.RefundRequest) -> PaymentCommand:
        """Parse a CaptureRequest, VoidRequest or RefundRequest."""
        return cls.parse({"reference": request.reference, "idempotency_key": request.idempotency_key})


class PaymentQuery(_Model):
    """Read the payment of `reference`."""

    reference: Reference

    @classmethod
    def from_proto(cls, request: pb.GetPaymentRequest) -> PaymentQuery:
        """Parse a GetPaymentRequest."""
        return cls.parse({"reference": request.reference})
