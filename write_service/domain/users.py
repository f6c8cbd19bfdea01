"""The User aggregate: its state, the rules that guard it and the events it records.

Rules:
- email and username are unique case-insensitively (checked by the handler against the
  repository, and by the database's unique indexes for the race between two commands);
- only an active user's profile may change: a deactivated account is frozen, so the
  read side never shows edits made after the owner was switched off;
- a user is deactivated at most once;
- a command that names an expected version applies only to exactly that version.

Versions and events work as in `aggregate.Aggregate`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar

from shared_kernel.contracts.errors import AlreadyExists, FailedPrecondition
from tessera.users.v1 import events_pb2
from write_service.domain.aggregate import Aggregate, timestamp

USER_AGGREGATE = "user"

# UserRegistered's schema version: 2 carries the name in display_name (read side: read_service.upcasting).
USER_REGISTERED_SCHEMA_VERSION = 2


def email_taken() -> AlreadyExists:
    """The error for an e-mail address another user already has."""
    return AlreadyExists("email is already registered", field="email")


def username_taken() -> AlreadyExists:
    """The error for a username another user already has."""
    return AlreadyExists("username is already taken", field="username")


@dataclass(eq=False, kw_only=True)
class User(Aggregate):
    """A user account as the write side knows it."""

    aggregate_type: ClassVar[str] = USER_AGGREGATE

    email: str
    username: str
    # Kept out of repr so a logged aggregate never shows even the hash.
    password_hash: str = field(repr=False)
    full_name: str
    bio: str = ""
    avatar_url: str = ""
    active: bool = True
    deactivation_reason: str = ""
    created_at: datetime

    @classmethod
    def register(
        cls,
        *,
        user_id: uuid.UUID,
        email: str,
        username: str,
        password_hash: str,
        full_name: str,
        now: datetime,
    ) -> User:
        """Create a new, active user at version 1 and record UserRegistered."""
        user = cls(
            id=user_id,
            email=email,
            username=username,
            password_hash=password_hash,
            full_name=full_name,
            version=0,
            created_at=now,
            updated_at=now,
        )
        user._record(
            events_pb2.UserRegistered(
                user_id=str(user_id),
                email=email,
                username=username,
                display_name=full_name,
                registered_at=timestamp(now),
            ),
            now,
            schema_version=USER_REGISTERED_SCHEMA_VERSION,
        )
        return user

    def update_profile(self, *, full_name: str, bio: str, avatar_url: str, now: datetime) -> None:
        """Replace the profile and record UserProfileUpdated; a deactivated user is frozen."""
        if not self.active:
            raise FailedPrecondition("user is deactivated; its profile can no longer be changed")
        self.full_name = full_name
        self.bio = bio
        self.avatar_url = avatar_url
        self._record(
            events_pb2.UserProfileUpdated(
                user_id=str(self.id),
                full_name=full_name,
                bio=bio,
                avatar_url=avatar_url,
                updated_at=timestamp(now),
            ),
            now,
        )

    def deactivate(self, *, reason: str, now: datetime) -> None:
        """Deactivate the user and record UserDeactivated; only an active user can be deactivated."""
        if not self.active:
            raise FailedPrecondition("user is already deactivated")
        self.active = False
        self.deactivation_reason = reason
        self._record(
            events_pb2.UserDeactivated(user_id=str(self.id), reason=reason, deactivated_at=timestamp(now)),
            now,
        )
