"""Unit tests of the shared kernel's pure parts."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from pydantic import BaseModel, Field, ValidationError

from shared_kernel.contracts import errors
from shared_kernel.contracts.validation import canonical_uuid, has_control_chars, parse_uuid
from shared_kernel.platform import grpc_errors, migrations
from shared_kernel.platform.grpc_errors import status_for, to_domain_error
from shared_kernel.platform.logs import JsonFormatter


def _details(status: grpc.Status) -> status_pb2.Status:
    for key, value in status.trailing_metadata:
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError("no rich status in trailing metadata")


def test_invalid_argument_carries_bad_request_violations() -> None:
    error = errors.InvalidArgument(
        [errors.FieldViolation("email", "not an e-mail address"), errors.FieldViolation("username", "too short")]
    )
    status = status_for(error)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    rich = _details(status)
    bad_request = error_details_pb2.BadRequest()
    assert rich.details[0].Unpack(bad_request)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("email", "not an e-mail address"),
        ("username", "too short"),
    ]


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.NotFound("user x not found"), grpc.StatusCode.NOT_FOUND),
        (errors.AlreadyExists("email taken", field="email"), grpc.StatusCode.ALREADY_EXISTS),
        (errors.FailedPrecondition("already deactivated"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.Conflict("retry"), grpc.StatusCode.ABORTED),
        (errors.Unavailable("db down"), grpc.StatusCode.UNAVAILABLE),
        (errors.ResourceExhausted("slow"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
def test_each_domain_error_has_its_code(error: errors.DomainError, code: grpc.StatusCode) -> None:
    status = status_for(error)
    assert status.code == code
    assert status.details == error.message


def test_driver_errors_are_translated() -> None:
    assert isinstance(to_domain_error(ConnectionRefusedError()), errors.Unavailable)
    assert to_domain_error(ValueError("a bug")) is None


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


def test_migrations_are_numbered_without_gaps(tmp_path: Path) -> None:
    assert [m.version for m in migrations.discover()] == list(range(1, len(migrations.discover()) + 1))
    (tmp_path / "0001_a.sql").write_text("select 1")
    (tmp_path / "0003_c.sql").write_text("select 1")
    with pytest.raises(ValueError, match="without gaps"):
        migrations.discover(tmp_path)
    (tmp_path / "two.sql").write_text("select 1")
    with pytest.raises(ValueError, match=r"0001_name\.sql"):
        migrations.discover(tmp_path)


def test_json_log_lines_carry_extras() -> None:
    record = logging.LogRecord("svc", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    record.user_id = "u-1"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "hello world"
    assert line["user_id"] == "u-1"
    assert line["level"] == "INFO"


class ExecuteBatchError(Exception):
    """Stands in for grpcio's private error of a batch sent on a call that is gone (matched by name)."""


class _GoneWhileAborting:
    """A servicer context whose caller leaves just as the status is sent."""

    def cancelled(self) -> bool:
        return False

    def trailing_metadata(self) -> tuple[()]:
        return ()

    async def abort(self, code: Any, details: str, metadata: Any = ()) -> None:
        raise ExecuteBatchError('Failed "execute_batch"')


@pytest.mark.parametrize(
    "failure",
    [errors.DeadlineExceeded("the caller's deadline ran out"), RuntimeError("a bug")],
    ids=["mapped", "unhandled"],
)
async def test_a_status_that_cannot_be_sent_ends_the_call_cancelled(failure: Exception) -> None:
    context: Any = _GoneWhileAborting()
    with pytest.raises(asyncio.CancelledError) as ended:
        await grpc_errors.handle_error(failure, "/x.Y/Z", context)
    assert ended.value.__cause__ is failure
