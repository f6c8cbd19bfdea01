"""Users in Postgres: the `users` table, and the customer facts an order reads from it."""

from __future__ import annotations

import uuid

from shared_kernel.contracts.identity import email_key
from write_service.adapters.pg_calls import Calls, Step
from write_service.domain import orders, users
from write_service.service_layer.ports import UserRepository

# The unique indexes (migrations 0001 and 0003) and the error (naming the request field) each one means.
_USER_UNIQUE_ERRORS = {"users_email_key_key": users.email_taken, "users_username_lower_key": users.username_taken}

_USER_COLUMNS = (
    "id, email, username, password_hash, full_name, bio, avatar_url, active, "
    "deactivation_reason, version, created_at, updated_at"
)

_SELECT = f"SELECT {_USER_COLUMNS} FROM users WHERE id = $1"  # noqa: S608 - constant columns

_SELECT_CUSTOMER = "SELECT id, full_name, email, active FROM users WHERE id = $1"

# The same reads on a retry after a lost guard (`Calls.lock_reads`), in its explicit transaction.
_SELECT_LOCKED = _SELECT + " FOR UPDATE"
_SELECT_CUSTOMER_LOCKED = _SELECT_CUSTOMER + " FOR SHARE"

# A step of the order's write: the customer is still active, and FOR SHARE keeps it so
# (no deactivation can commit in between) until the order's statement commits.
_CUSTOMER_STILL_ACTIVE = "SELECT 1 FROM users WHERE id = $1 AND active FOR SHARE"

# Both unique indexes can answer this: $1 is the e-mail key (shared_kernel.contracts.identity), and
# lower(username) matches the username index (usernames are ASCII by their pattern).
_TAKEN = """
SELECT coalesce(bool_or(email_key = $1), false) AS email,
       coalesce(bool_or(lower(username) = lower($2)), false) AS username
FROM users
WHERE email_key = $1 OR lower(username) = lower($2)
"""

_INSERT_USER = f"""
INSERT INTO users ({_USER_COLUMNS}, email_key)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
"""  # noqa: S608 - constant columns

_UPDATE_USER = """
UPDATE users
SET email = $2, username = $3, password_hash = $4, full_name = $5, bio = $6, avatar_url = $7,
    active = $8, deactivation_reason = $9, version = $10, updated_at = $11
WHERE id = $1 AND version = $12
RETURNING 1
"""


class PostgresUserRepository(UserRepository):
    """Users in the `users` table, read and written through the unit of work's calls."""

    def __init__(self, calls: Calls) -> None:
        self._calls = calls

    async def taken_fields(self, email: str, username: str) -> frozenset[str]:
        """Which of "email" and "username" another user already has, case-insensitively."""
        row = await self._calls.fetchrow(_TAKEN, email_key(email), username)
        if row is None:
            return frozenset()
        return frozenset(name for name in ("email", "username") if row[name])

    async def get(self, user_id: uuid.UUID) -> users.User | None:
        """The user as stored now; its save is guarded by the version read here."""
        row = await self._calls.fetchrow(_SELECT_LOCKED if self._calls.lock_reads else _SELECT, user_id)
        if row is None:
            return None
        self._calls.loaded.add(("user", user_id))
        return users.User(
            id=row["id"],
            email=row["email"],
            username=row["username"],
            password_hash=row["password_hash"],
            full_name=row["full_name"],
            bio=row["bio"],
            avatar_url=row["avatar_url"],
            active=row["active"],
            deactivation_reason=row["deactivation_reason"],
            version=row["version"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            stored_version=row["version"],
        )

    async def get_customer(self, user_id: uuid.UUID) -> orders.Customer | None:
        """The user's customer facts; an active one must still be active when the write commits."""
        query = _SELECT_CUSTOMER_LOCKED if self._calls.lock_reads else _SELECT_CUSTOMER
        row = await self._calls.fetchrow(query, user_id)
        if row is None:
            return None
        if row["active"]:
            self._calls.write(
                Step(
                    _CUSTOMER_STILL_ACTIVE,
                    (user_id,),
                    expect_rows=1,
                    conflict=f"customer {user_id} changed concurrently, retry the request",
                    writes=False,
                )
            )
        return orders.Customer(id=row["id"], full_name=row["full_name"], email=row["email"], active=row["active"])

    async def add(self, user: users.User) -> None:
        """Insert a new user at commit; a unique-index violation (a concurrent twin) becomes AlreadyExists."""
        self._calls.write(
            Step(
                _INSERT_USER,
                (
                    *_user_columns(user),
                    user.created_at,
                    user.updated_at,
                    email_key(user.email),
                ),
                unique=_USER_UNIQUE_ERRORS,
            )
        )
        await self._calls.check_insert_now()
        user.stored_version = user.version

    def adopt(self, user: users.User) -> None:
        """Its save is guarded by its stored version, as if it had been read here."""
        self._calls.loaded.add(("user", user.id))

    async def save(self, user: users.User) -> None:
        """Update the row at commit if it is still at the version loaded; otherwise the commit raises Conflict."""
        self._calls.write(
            Step(
                _UPDATE_USER,
                (
                    *_user_columns(user),
                    user.updated_at,
                    user.stored_version,
                ),
                expect_rows=1,
                conflict=f"user {user.id} changed concurrently, retry the request",
            )
        )
        await self._calls.check_version_now("user", user.id)
        user.stored_version = user.version


def _user_columns(user: users.User) -> tuple[object, ...]:
    """The columns an insert and an update of a user both write, in their parameter order."""
    return (
        user.id,
        user.email,
        user.username,
        user.password_hash,
        user.full_name,
        user.bio,
        user.avatar_url,
        user.active,
        user.deactivation_reason,
        user.version,
    )
