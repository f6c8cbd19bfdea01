"""Request checks the catalog and orders query services share (each returns violations, never raises)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp

from read_service.page_tokens import InvalidPageToken, PageTokenCodec
from shared_kernel.contracts import errors
from shared_kernel.contracts.validation import has_control_chars
from tessera.orders.v1.order_pb2 import OrderStatus

MAX_SEARCH_CHARS = 100
CURRENCY_CODE = re.compile(r"^[A-Z]{3}$")
# google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799
_STATUS_NAMES = list(OrderStatus.keys())[1:]  # every status but UNSPECIFIED


@dataclass(frozen=True, slots=True)
class PageLimits:
    """How large a page may be."""

    default: int = 20
    maximum: int = 100


def page_size(value: int, limits: PageLimits, violations: list[errors.FieldViolation], field: str = "page_size") -> int:
    """The page size to use (the default for 0); adds a violation when out of range."""
    if value < 0:
        violations.append(errors.FieldViolation(field, "must not be negative"))
    elif value > limits.maximum:
        violations.append(errors.FieldViolation(field, f"must be at most {limits.maximum}"))
    return value or limits.default


def statuses(values: Sequence[int], violations: list[errors.FieldViolation], field: str = "statuses") -> frozenset[int]:
    """The status filter as a set; adds a violation for each value that is no status."""
    for index, value in enumerate(values):
        if value not in OrderStatus.values() or value == OrderStatus.ORDER_STATUS_UNSPECIFIED:
            violations.append(errors.FieldViolation(f"{field}[{index}]", "must be one of " + ", ".join(_STATUS_NAMES)))
    return frozenset(values)


def text(value: str, field: str, violations: list[errors.FieldViolation]) -> str:
    """Search text, case-folded; adds a violation when too long or holding control characters."""
    if len(value) > MAX_SEARCH_CHARS:
        violations.append(errors.FieldViolation(field, f"must be at most {MAX_SEARCH_CHARS} characters"))
    elif has_control_chars(value):
        violations.append(errors.FieldViolation(field, "must not contain control characters"))
    return value.casefold()


def timestamp_micros(
    value: Timestamp, present: bool, field: str, violations: list[errors.FieldViolation]
) -> int | None:
    """A set timestamp in microseconds since the epoch (None when unset); adds a violation when invalid."""
    if not present:
        return None
    if not _MIN_SECONDS <= value.seconds <= _MAX_SECONDS or not 0 <= value.nanos <= 999_999_999:
        violations.append(
            errors.FieldViolation(field, "must be a valid timestamp (years 1 to 9999, nanos 0 to 999999999)")
        )
        return None
    return value.seconds * 1_000_000 + value.nanos // 1000


def currency_code(value: str, field: str, violations: list[errors.FieldViolation]) -> str:
    """An ISO 4217 code (three upper-case letters); adds a violation otherwise."""
    if not value:
        violations.append(errors.FieldViolation(field, "is required"))
    elif not CURRENCY_CODE.match(value):
        violations.append(
            errors.FieldViolation(field, "must be an ISO 4217 code of three upper-case letters, e.g. EUR")
        )
    return value


def open_page_token(tokens: PageTokenCodec, token: str, binding: bytes) -> bytes | None:
    """The cursor inside a page token (None when empty); InvalidArgument on `page_token` when it is not genuine."""
    if not token:
        return None
    try:
        return tokens.open(token, binding)
    except InvalidPageToken as exc:
        raise errors.InvalidArgument.single("page_token", str(exc)) from exc
