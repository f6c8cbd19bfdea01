"""The users' commands: register, update a profile, deactivate (aggregate "user").

Field names match the protobuf request fields, so a violation names the field the caller
sent; `bio` alone may hold line feeds and tabs, because it is multi-line free text.
"""

from __future__ import annotations

import re
from typing import ClassVar

from email_validator import EmailNotValidError, validate_email
from pydantic import AnyHttpUrl, SecretStr, TypeAdapter, ValidationError, field_validator

from shared_kernel.contracts.validation import has_control_chars
from write_service.commands.base import (
    REASON_MAX,
    AggregateId,
    ChangeCommand,
    Command,
    SummaryValue,
    optional_text,
    required_text,
    single_line,
)
from write_service.domain.users import USER_AGGREGATE

USERNAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{2,31}$")
PASSWORD_MIN, PASSWORD_MAX = 8, 128
FULL_NAME_MAX = 200
BIO_MAX = 2000
AVATAR_URL_MAX = 2048


class RegisterUser(Command):
    """Create a user account."""

    aggregate_type: ClassVar[str] = USER_AGGREGATE

    email: str
    username: str
    password: SecretStr
    full_name: str

    @field_validator("email")
    @classmethod
    def _check_email(cls, value: str) -> str:
        single_line(value)
        if not value:
            raise ValueError("is required")
        try:
            # Syntax only: a DNS look-up would make validation slow and flaky.
            validate_email(value, check_deliverability=False)
        except EmailNotValidError as exc:
            raise ValueError(f"is not a valid e-mail address: {exc}") from None
        return value

    @field_validator("username")
    @classmethod
    def _check_username(cls, value: str) -> str:
        if not value:
            raise ValueError("is required")
        if USERNAME_PATTERN.fullmatch(value) is None:
            raise ValueError(
                "must be 3 to 32 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return value

    @field_validator("password")
    @classmethod
    def _check_password(cls, value: SecretStr) -> SecretStr:
        clear = value.get_secret_value()
        if not PASSWORD_MIN <= len(clear) <= PASSWORD_MAX:
            raise ValueError(f"must be {PASSWORD_MIN} to {PASSWORD_MAX} characters")
        if has_control_chars(clear):
            raise ValueError("must not contain control characters")
        return value

    @field_validator("full_name")
    @classmethod
    def _check_full_name(cls, value: str) -> str:
        return required_text(value, FULL_NAME_MAX)

    def summary(self) -> dict[str, SummaryValue]:
        """Email and username only; the password never leaves the command."""
        return {"email": self.email, "username": self.username}


class UpdateUserProfile(ChangeCommand):
    """Replace a user's full name, bio and avatar URL."""

    aggregate_type: ClassVar[str] = USER_AGGREGATE
    id_field: ClassVar[str] = "user_id"

    user_id: AggregateId
    full_name: str
    bio: str = ""
    avatar_url: str = ""

    @field_validator("full_name")
    @classmethod
    def _check_full_name(cls, value: str) -> str:
        return required_text(value, FULL_NAME_MAX)

    @field_validator("bio")
    @classmethod
    def _check_bio(cls, value: str) -> str:
        return optional_text(value, BIO_MAX, multi_line=True)

    @field_validator("avatar_url")
    @classmethod
    def _check_avatar_url(cls, value: str) -> str:
        if not value:
            return value
        single_line(value)
        if len(value) > AVATAR_URL_MAX:
            raise ValueError(f"must be at most {AVATAR_URL_MAX} characters")
        if not _is_http_url(value):
            raise ValueError("must be an http or https URL with a host")
        return value

    def summary(self) -> dict[str, SummaryValue]:
        """The user and the shape of the change; the event holds the full profile."""
        return self.versioned_summary(
            full_name_chars=len(self.full_name), bio_chars=len(self.bio), avatar_url_set=bool(self.avatar_url)
        )


class DeactivateUser(ChangeCommand):
    """Deactivate an active user."""

    aggregate_type: ClassVar[str] = USER_AGGREGATE
    id_field: ClassVar[str] = "user_id"

    user_id: AggregateId
    reason: str

    @field_validator("reason")
    @classmethod
    def _check_reason(cls, value: str) -> str:
        return required_text(value, REASON_MAX)

    def summary(self) -> dict[str, SummaryValue]:
        """The user and the reason given."""
        return self.versioned_summary(reason=self.reason)


_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>[^\s]+)$")


_HTTP_URL: TypeAdapter[AnyHttpUrl] = TypeAdapter(AnyHttpUrl)


def _is_http_url(value: str) -> bool:
    """True for an absolute http(s) URL whose host pydantic accepts."""
    match = _URL.match(value)
    if match is None or match["scheme"].lower() not in {"http", "https"}:
        return False
    try:
        url = _HTTP_URL.validate_python(value)
    except ValidationError:
        return False
    return bool(url.host)
