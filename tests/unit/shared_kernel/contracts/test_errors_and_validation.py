"""Domain errors as the API states them, and the field rules of its inputs."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field, ValidationError

from shared_kernel.contracts import errors
from shared_kernel.contracts.validation import canonical_uuid, has_control_chars, parse_uuid


def test_pydantic_errors_become_field_paths() -> None:
    class Item(BaseModel):
        quantity: int = Field(gt=0)

    class Order(BaseModel):
        items: list[Item]

    with pytest.raises(ValidationError) as info:
        Order.model_validate({"items": [{"quantity": 1}, {"quantity": 0}]})
    violations = errors.violations_from_pydantic(info.value.errors())  # type: ignore[arg-type]
    assert [v.field for v in violations] == ["items[1].quantity"]


def test_invalid_argument_needs_a_violation() -> None:
    with pytest.raises(ValueError, match="at least one"):
        errors.InvalidArgument([])


@pytest.mark.parametrize(
    "value",
    [
        "",
        "not-a-uuid",
        "123e4567e89b12d3a456426614174000",
        "{123e4567-e89b-12d3-a456-426614174000}",
        "123e4567-e89b-12d3-a456-42661417400\n",
        "*" * 36,
        "x" * 10_000,
    ],
)
def test_parse_uuid_rejects_non_canonical(value: str) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        parse_uuid("user_id", value)
    assert info.value.violations[0].field == "user_id"
    with pytest.raises(errors.InvalidArgument) as info:
        canonical_uuid("user_id", value)
    assert info.value.violations[0].field == "user_id"


def test_parse_uuid_accepts_canonical_any_case() -> None:
    assert str(parse_uuid("id", "123E4567-E89B-12D3-A456-426614174000")) == "123e4567-e89b-12d3-a456-426614174000"
    assert canonical_uuid("id", "123E4567-E89B-12D3-A456-426614174000") == "123e4567-e89b-12d3-a456-426614174000"


@pytest.mark.parametrize(("value", "expected"), [("plain", False), ("a\nb", True), ("nul\x00", True), ("\u2028", True)])
def test_control_characters(value: str, expected: bool) -> None:
    assert has_control_chars(value) is expected
