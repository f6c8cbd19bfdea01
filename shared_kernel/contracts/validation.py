"""Validation helpers shared by request mappers on both sides."""

from __future__ import annotations

import re
import uuid

from email_validator import EmailNotValidError, validate_email

from shared_kernel.contracts.errors import FieldViolation, InvalidArgument

# C0 and C1 control characters (tab, newline and friends included) and the Unicode
# line/paragraph separators: none belongs in an id, a name or a single-line field.
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

# RFC 5321's limit on a forward path; longer input is refused before any parsing.
MAX_EMAIL_CHARS = 320


def has_control_chars(value: str) -> bool:
    """True when `value` holds a control character."""
    return CONTROL_CHARS.search(value) is not None


def uuid_violation(field: str, value: str) -> FieldViolation | None:
    """A violation when `value` is not a canonical UUID, else None."""
    if not value:
        return FieldViolation(field, "is required")
    if len(value) != 36:
        return FieldViolation(field, "must be a UUID like 123e4567-e89b-12d3-a456-426614174000")
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        return FieldViolation(field, "must be a UUID like 123e4567-e89b-12d3-a456-426614174000")
    if str(parsed) != value.lower():
        return FieldViolation(field, "must be a UUID like 123e4567-e89b-12d3-a456-426614174000")
    return None


_CANONICAL_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def canonical_uuid(field: str, value: str) -> str:
    """The canonical (lower-case) text of a UUID, or InvalidArgument naming `field`; `parse_uuid`'s rules."""
    # One regular expression instead of two UUID objects and a comparison, for the query path.
    if _CANONICAL_UUID.fullmatch(value) is not None:
        return value.lower()
    return str(parse_uuid(field, value))


def parse_uuid(field: str, value: str) -> uuid.UUID:
    """Parse a canonical UUID or raise InvalidArgument naming `field`."""
    violation = uuid_violation(field, value)
    if violation is not None:
        raise InvalidArgument([violation])
    return uuid.UUID(value)


def email_violation(field: str, value: str) -> FieldViolation | None:
    """A violation when `value` is not a syntactically valid e-mail address, else None.

    Syntax only (no DNS look-up), with the same library and options the write side uses
    to accept an address, so every registered address passes.
    """
    if not value:
        return FieldViolation(field, "is required")
    if len(value) > MAX_EMAIL_CHARS:
        return FieldViolation(field, f"must be at most {MAX_EMAIL_CHARS} characters")
    if has_control_chars(value):
        return FieldViolation(field, "must not contain control characters")
    try:
        validate_email(value, check_deliverability=False)
    except EmailNotValidError as exc:
        return FieldViolation(field, f"is not a valid e-mail address: {exc}")
    return None
