"""The project's error types. Each maps to exactly one gRPC status code (see grpc_errors)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid field of a request: its path (e.g. `items[0].quantity`) and why."""

    field: str
    description: str


class DomainError(Exception):
    """Base of every error the services raise on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(DomainError):
    """The request is malformed; maps to INVALID_ARGUMENT with BadRequest field violations."""

    def __init__(self, violations: Sequence[FieldViolation], message: str | None = None) -> None:
        if not violations:
            raise ValueError("InvalidArgument needs at least one field violation")
        self.violations = tuple(violations)
        fields = ", ".join(sorted({v.field for v in violations}))
        super().__init__(message or f"invalid request: {fields}")

    @classmethod
    def single(cls, field: str, description: str) -> InvalidArgument:
        """Build an error for one bad field."""
        return cls([FieldViolation(field, description)])


class NotFound(DomainError):
    """The named entity does not exist; maps to NOT_FOUND."""


class AlreadyExists(DomainError):
    """A unique value is taken; maps to ALREADY_EXISTS. `field` names the value."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class FailedPrecondition(DomainError):
    """A business rule or an expected version forbids the command; maps to FAILED_PRECONDITION."""


class Conflict(DomainError):
    """A transient conflict (serialization failure, deadlock); retrying may succeed. Maps to ABORTED."""


class Unavailable(DomainError):
    """A dependency (Postgres, Redis, a provider) cannot be reached; maps to UNAVAILABLE."""


class ResourceExhausted(DomainError):
    """A limit was hit (too slow a watcher, too many calls); maps to RESOURCE_EXHAUSTED."""


class DeadlineExceeded(DomainError):
    """The caller's own deadline ran out before the answer was ready; maps to DEADLINE_EXCEEDED."""


def violations_from_pydantic(errors: Iterable[dict[str, object]], prefix: str = "") -> list[FieldViolation]:
    """Turn pydantic's `ValidationError.errors()` into field violations with dotted paths."""
    result: list[FieldViolation] = []
    for error in errors:
        loc = error.get("loc", ())
        parts: list[str] = []
        for item in loc if isinstance(loc, tuple) else ():
            if isinstance(item, int):
                parts.append(f"[{item}]")
            else:
                parts.append(("." if parts else "") + str(item))
        path = "".join(parts) or "request"
        if prefix:
            path = f"{prefix}.{path}"
        message = str(error.get("msg", "invalid value"))
        # pydantic prefixes custom errors with "Value error, "; callers do not need it.
        message = message.removeprefix("Value error, ")
        result.append(FieldViolation(path, message))
    return result
