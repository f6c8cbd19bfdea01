"""What every command shares: validation into an immutable command, its log summary and its fingerprint.

Each bounded context declares its own commands in `write_service.commands.<context>`.

Field names match the protobuf request fields, so a violation names the field the caller
sent. Every field rejects control characters (NUL included); `bio` alone may hold line
feeds and tabs, because it is multi-line free text. Lengths count Unicode code points.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
)

from shared_kernel.contracts.errors import FieldViolation, InvalidArgument, violations_from_pydantic
from shared_kernel.contracts.validation import has_control_chars, uuid_violation

REASON_MAX = 500

# shared_kernel.contracts.validation.CONTROL_CHARS minus line feed and tab, which multi-line text needs.
_CONTROL_CHARS_BUT_LF_TAB = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")

SummaryValue = str | int | bool
# JSON-ready values: nested commands (an order's items and address) become lists and objects.
FingerprintValue = str | int | bool | None | list[Any] | dict[str, Any]

# An expected version is one the aggregate can have: versions start at 1 (and are bigint).
ExpectedVersion = Annotated[int | None, Field(ge=1, le=2**63 - 1)]


def single_line(value: str) -> str:
    """`value` unless it holds a control character."""
    if has_control_chars(value):
        raise ValueError("must not contain control characters")
    return value


def required_text(value: str, maximum: int) -> str:
    """`value` if it is 1 to `maximum` characters on one line and not blank."""
    single_line(value)
    if not value:
        raise ValueError("is required")
    if len(value) > maximum:
        raise ValueError(f"must be at most {maximum} characters")
    if not value.strip():
        raise ValueError("must not be blank")
    return value


def optional_text(value: str, maximum: int, *, multi_line: bool = False) -> str:
    """`value` if it is at most `maximum` characters without control characters (LF and tab if `multi_line`)."""
    if multi_line:
        if _CONTROL_CHARS_BUT_LF_TAB.search(value) is not None:
            raise ValueError("must not contain control characters other than line feed and tab")
    else:
        single_line(value)
    if len(value) > maximum:
        raise ValueError(f"must be at most {maximum} characters")
    return value


def bounded_int(value: int, minimum: int, maximum: int) -> int:
    """`value` if it lies in minimum..maximum."""
    if not minimum <= value <= maximum:
        raise ValueError(f"must be {minimum} to {maximum}")
    return value


def uuid_value(value: object) -> uuid.UUID:
    """A canonical UUID string (or a UUID) as a UUID; anything else is a ValueError for pydantic."""
    if isinstance(value, uuid.UUID):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a UUID string")  # noqa: TRY004 - pydantic reports ValueError, not TypeError
    violation = uuid_violation("id", value)
    if violation is not None:
        raise ValueError(violation.description)
    return uuid.UUID(value)


class CommandPart(BaseModel):
    """A structured field of a command (an address, an item, an amount): immutable, no unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


class Command(BaseModel):
    """Base of every command: immutable, no unknown fields, inputs never echoed in errors."""

    # hide_input_in_errors keeps a rejected password out of a ValidationError's text.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    # The kind of aggregate the command targets (`user`, `product`, `order`); every command names it.
    aggregate_type: ClassVar[str]

    @classmethod
    def parse(cls, fields: Mapping[str, object], extra: Sequence[FieldViolation] = ()) -> Self:
        """Validate `fields` into a command; report every violation (plus `extra`) at once."""
        violations = [*extra, *cls.cross_field_violations(fields)]
        try:
            command = cls.model_validate(dict(fields))
        except ValidationError as exc:
            details = exc.errors(include_url=False, include_input=False, include_context=False)
            violations.extend(violations_from_pydantic(dict(d) for d in details))
        else:
            if not violations:
                return command
        # `from None`: the pydantic error adds nothing the violations lack.
        raise InvalidArgument(violations) from None

    @classmethod
    def cross_field_violations(cls, fields: Mapping[str, object]) -> list[FieldViolation]:
        """Violations that involve several fields of the raw input; reported with the others."""
        return []

    @property
    def command_type(self) -> str:
        """Stable name of the command, as written to the command log."""
        return type(self).__name__

    @property
    def aggregate_id(self) -> str:
        """Id of the aggregate the command targets, empty when it creates one."""
        return ""

    def summary(self) -> dict[str, SummaryValue]:
        """What the command log records about this command: never a secret."""
        raise NotImplementedError

    def fingerprint_fields(self) -> dict[str, FingerprintValue]:
        """The non-secret fields in a canonical, JSON-ready form (the idempotency fingerprint's input).

        A field left at its default is omitted: a field added to a command later, with a
        default, then leaves the fingerprints of requests that do not use it unchanged.
        """
        fields: dict[str, FingerprintValue] = {}
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            if isinstance(value, SecretStr) or (not info.is_required() and value == info.default):
                continue
            fields[name] = _json_ready(value)
        return fields

    def secret_fields(self) -> dict[str, SecretStr]:
        """The fields that must never be stored or hashed quickly (passwords)."""
        return {name: value for name in type(self).model_fields if isinstance(value := getattr(self, name), SecretStr)}


def required_part(value: object) -> object:
    """`value` unless it is None: a message field the caller left unset."""
    if value is None:
        raise ValueError("is required")
    return value


# The id of an aggregate a command names: a canonical UUID string.
AggregateId = Annotated[uuid.UUID, BeforeValidator(uuid_value)]
# A structured field (a CommandPart) that must be set.
Required = BeforeValidator(required_part)


class ChangeCommand(Command):
    """A command on an existing aggregate, named by its `id_field`, with an optional expected version."""

    # The field that holds the aggregate's id (`user_id`, `product_id`, `order_id`).
    id_field: ClassVar[str]

    expected_version: ExpectedVersion = None

    @property
    def aggregate_uuid(self) -> uuid.UUID:
        """The id of the aggregate the command changes."""
        value = getattr(self, self.id_field)
        assert isinstance(value, uuid.UUID)
        return value

    @property
    def aggregate_id(self) -> str:
        """The id of the aggregate the command changes, as text."""
        return str(self.aggregate_uuid)

    def versioned_summary(self, **fields: SummaryValue) -> dict[str, SummaryValue]:
        """The aggregate's id, `fields`, and the expected version when one was given."""
        summary: dict[str, SummaryValue] = {self.id_field: self.aggregate_id, **fields}
        if self.expected_version is not None:
            summary["expected_version"] = self.expected_version
        return summary


def _json_ready(value: object) -> FingerprintValue:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, BaseModel):
        dumped: dict[str, Any] = value.model_dump(mode="json")
        return dumped
    if isinstance(value, tuple | list):
        return [_json_ready(item) for item in value]
    assert isinstance(value, str | int | bool) or value is None
    return value
