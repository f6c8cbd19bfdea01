"""Validation of the write side's commands: every rule, every violation reported at once."""

from __future__ import annotations

import uuid

import pytest

from shared_kernel.contracts.errors import FieldViolation, InvalidArgument
from write_service.commands.users import DeactivateUser, RegisterUser, UpdateUserProfile

USER_ID = "123e4567-e89b-12d3-a456-426614174000"
SECRET = "s3cret-Passw0rd"


def register_fields(**overrides: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "email": "Ada@Example.com",
        "username": "ada.l",
        "password": SECRET,
        "full_name": "Ada Lovelace",
    }
    fields.update(overrides)
    return fields


def update_fields(**overrides: object) -> dict[str, object]:
    fields: dict[str, object] = {"user_id": USER_ID, "full_name": "Ada", "bio": "", "avatar_url": ""}
    fields.update(overrides)
    return fields


def violations(exc_info: pytest.ExceptionInfo[InvalidArgument]) -> dict[str, str]:
    return {v.field: v.description for v in exc_info.value.violations}


def test_register_keeps_the_callers_values():
    command = RegisterUser.parse(register_fields())
    assert command.email == "Ada@Example.com"
    assert command.username == "ada.l"
    assert command.password.get_secret_value() == SECRET
    assert command.command_type == "RegisterUser"
    assert command.aggregate_id == ""


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("email", "", "is required"),
        ("email", "not-an-address", "is not a valid e-mail address"),
        ("email", "a@b", "is not a valid e-mail address"),
        ("email", " ada@example.com", "is not a valid e-mail address"),
        ("email", "ada@exam\x00ple.com", "control characters"),
        ("email", "x" * 250 + "@example.com", "is not a valid e-mail address"),
        ("username", "", "is required"),
        ("username", "ab", "3 to 32 characters"),
        ("username", "a" * 33, "3 to 32 characters"),
        ("username", "_ada", "starting with a letter or digit"),
        ("username", "ada lovelace", "3 to 32 characters"),
        ("username", "adä", "3 to 32 characters"),
        ("password", "", "8 to 128 characters"),
        ("password", "1234567", "8 to 128 characters"),
        ("password", "x" * 129, "8 to 128 characters"),
        ("password", "passw\x00rd!", "control characters"),
        ("password", "password\n", "control characters"),
        ("full_name", "", "is required"),
        ("full_name", "   ", "must not be blank"),
        ("full_name", "x" * 201, "at most 200 characters"),
        ("full_name", "Ada\nLovelace", "control characters"),
        ("full_name", "Ada\u2028Lovelace", "control characters"),
    ],
)
def test_register_rejects(field, value, expected):
    with pytest.raises(InvalidArgument) as exc_info:
        RegisterUser.parse(register_fields(**{field: value}))
    found = violations(exc_info)
    assert list(found) == [field]
    assert expected in found[field]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("username", "abc"),
        ("username", "a" * 32),
        ("username", "9-lives_.x"),
        ("password", "x" * 8),
        ("password", "ü" * 128),
        ("password", " leading and trailing spaces "),
        ("full_name", "x" * 200),
        ("full_name", "José Ñúñez 李"),
        ("email", "josé@exämple.com"),
    ],
)
def test_register_accepts_boundaries(field, value):
    RegisterUser.parse(register_fields(**{field: value}))


def test_every_violation_is_reported_together():
    with pytest.raises(InvalidArgument) as exc_info:
        RegisterUser.parse({"email": "nope", "username": "x", "password": "short", "full_name": ""})
    assert set(violations(exc_info)) == {"email", "username", "password", "full_name"}


def test_extra_violations_join_the_field_violations():
    extra = [FieldViolation("x-correlation-id", "bad")]
    with pytest.raises(InvalidArgument) as exc_info:
        RegisterUser.parse(register_fields(email="nope"), extra)
    assert set(violations(exc_info)) == {"x-correlation-id", "email"}
    with pytest.raises(InvalidArgument) as exc_info:
        RegisterUser.parse(register_fields(), extra)
    assert set(violations(exc_info)) == {"x-correlation-id"}


def test_the_password_never_shows():
    command = RegisterUser.parse(register_fields())
    assert SECRET not in repr(command)
    assert SECRET not in str(command)
    assert SECRET not in str(command.summary())
    assert SECRET not in command.model_dump_json()
    bad = "\x01" + SECRET
    with pytest.raises(InvalidArgument) as exc_info:
        RegisterUser.parse(register_fields(password=bad))
    error = exc_info.value
    assert SECRET not in str(error)
    assert SECRET not in repr(error.violations)
    assert error.__cause__ is None
    assert error.__suppress_context__


def test_register_summary_is_redacted():
    assert RegisterUser.parse(register_fields()).summary() == {"email": "Ada@Example.com", "username": "ada.l"}


def test_update_accepts_multiline_bio_and_http_urls():
    command = UpdateUserProfile.parse(
        update_fields(bio="line one\nline\ttwo", avatar_url="https://cdn.example.com/a.png?s=64")
    )
    assert command.user_id == uuid.UUID(USER_ID)
    assert command.aggregate_id == USER_ID
    UpdateUserProfile.parse(update_fields(avatar_url="HTTP://example.com"))
    UpdateUserProfile.parse(update_fields(bio="b" * 2000, avatar_url="https://e.com/" + "a" * (2048 - 14)))


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("user_id", "", "is required"),
        ("user_id", "42", "must be a UUID"),
        ("user_id", "123e4567e89b12d3a456426614174000", "must be a UUID"),
        ("user_id", "{123e4567-e89b-12d3-a456-426614174000}", "must be a UUID"),
        ("bio", "b" * 2001, "at most 2000 characters"),
        ("bio", "windows\r\nline", "control characters other than line feed and tab"),
        ("bio", "nul\x00", "control characters"),
        ("avatar_url", "ftp://example.com/a.png", "http or https"),
        ("avatar_url", "example.com/a.png", "http or https"),
        ("avatar_url", "javascript:alert(1)", "http or https"),
        ("avatar_url", "https://", "http or https"),
        ("avatar_url", "https://exa mple.com/", "http or https"),
        ("avatar_url", "https://e.com/" + "a" * 2035, "at most 2048 characters"),
        ("avatar_url", "https://e.com/\x00", "control characters"),
        ("full_name", "", "is required"),
    ],
)
def test_update_rejects(field, value, expected):
    with pytest.raises(InvalidArgument) as exc_info:
        UpdateUserProfile.parse(update_fields(**{field: value}))
    found = violations(exc_info)
    assert list(found) == [field]
    assert expected in found[field]


def test_user_id_in_capitals_is_accepted_and_normalized():
    command = DeactivateUser.parse({"user_id": USER_ID.upper(), "reason": "spam"})
    assert command.aggregate_id == USER_ID


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", "is required"), ("  ", "must not be blank"), ("r" * 501, "at most 500"), ("a\tb", "control")],
)
def test_deactivate_rejects_bad_reasons(value, expected):
    with pytest.raises(InvalidArgument) as exc_info:
        DeactivateUser.parse({"user_id": USER_ID, "reason": value})
    assert expected in violations(exc_info)["reason"]


def test_deactivate_accepts_500_characters():
    command = DeactivateUser.parse({"user_id": USER_ID, "reason": "r" * 500})
    assert command.summary() == {"user_id": USER_ID, "reason": "r" * 500}


def test_unknown_fields_are_rejected():
    with pytest.raises(InvalidArgument) as exc_info:
        DeactivateUser.parse({"user_id": USER_ID, "reason": "x", "force": True})
    assert "force" in violations(exc_info)


def test_commands_are_immutable():
    command = DeactivateUser.parse({"user_id": USER_ID, "reason": "x"})
    with pytest.raises(ValueError, match="frozen"):
        command.reason = "y"


@pytest.mark.parametrize("command_type", [UpdateUserProfile, DeactivateUser])
def test_expected_version_is_optional_and_at_least_1(command_type):
    fields = update_fields() if command_type is UpdateUserProfile else {"user_id": USER_ID, "reason": "r"}
    assert command_type.parse(fields).expected_version is None
    assert command_type.parse({**fields, "expected_version": 7}).expected_version == 7
    assert command_type.parse({**fields, "expected_version": 2**63 - 1}).expected_version == 2**63 - 1
    for bad in (0, 2**63):
        with pytest.raises(InvalidArgument) as exc_info:
            command_type.parse({**fields, "expected_version": bad})
        assert list(violations(exc_info)) == ["expected_version"]


def test_an_expected_version_shows_in_the_summary_and_the_fingerprint_fields():
    command = UpdateUserProfile.parse(update_fields(expected_version=3))
    assert command.summary()["expected_version"] == 3
    assert command.fingerprint_fields() == {"user_id": USER_ID, "full_name": "Ada", "expected_version": 3}
    assert "expected_version" not in UpdateUserProfile.parse(update_fields()).summary()


def test_fields_at_their_default_stay_out_of_the_fingerprint():
    # So adding an optional field later does not change the fingerprint of older requests.
    plain = UpdateUserProfile.parse({"user_id": USER_ID, "full_name": "Ada"})
    explicit = UpdateUserProfile.parse(update_fields(bio="", avatar_url="", expected_version=None))
    assert plain.fingerprint_fields() == explicit.fingerprint_fields() == {"user_id": USER_ID, "full_name": "Ada"}
    assert UpdateUserProfile.parse(update_fields(bio="b")).fingerprint_fields()["bio"] == "b"


def test_the_fingerprint_fields_leave_the_password_out():
    command = RegisterUser.parse(register_fields())
    assert command.fingerprint_fields() == {
        "email": "Ada@Example.com",
        "username": "ada.l",
        "full_name": "Ada Lovelace",
    }
    assert [(name, value.get_secret_value()) for name, value in command.secret_fields().items()] == [
        ("password", SECRET)
    ]
