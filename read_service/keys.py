"""The Redis key layout of the users read model, in one place for the projection and the queries.

Every key starts with the deployment's `redis_key_prefix` (written `P` below):

    P users:checkpoint                  string  last event-log position applied to these views
    P users:view:<user id>              string  serialized tessera.users.v1.UserView
    P users:by_email                    hash    lower-cased e-mail -> user id
    P users:stats                       hash    `users` and `active_users` counters
    P users:idx:<sort>:<subset>         zset    one member per user, every score 0, ordered by member

`<sort>` is `created_at`, `email` or `username`; `<subset>` is `all`, `active` or `inactive`,
so that every (sort, filter) pair of ListUsers reads one index in order. A member is the sort
key followed by NUL and the user id, so that lexicographic order (ZRANGE BYLEX) is the sort
order tie-broken by id, and the member itself is an exact keyset cursor.

Redis Cluster is not supported: the apply script (apply_event.lua) writes keys it does not
declare in KEYS, so all of them must live on one node (a single Redis, or a primary with
replicas).
"""

from __future__ import annotations

from enum import StrEnum

from shared_kernel.identity import email_key as shared_email_key
from tessera.users.v1.user_query_service_pb2 import UserView

# Separates the sort key from the id inside an index member. NUL sorts before every other
# byte, so "ab" + NUL + id orders before "abc" + NUL + id, as "ab" orders before "abc".
MEMBER_SEPARATOR = b"\x00"

# created_at in microseconds since the epoch, zero-padded so that byte order is time order.
_CREATED_AT_DIGITS = 20


class SortField(StrEnum):
    """The orders ListUsers offers; each value names an index in the key layout."""

    CREATED_AT = "created_at"
    EMAIL = "email"
    USERNAME = "username"


class Subset(StrEnum):
    """The account-state subsets ListUsers can filter on; each value names an index."""

    ALL = "all"
    ACTIVE = "active"
    INACTIVE = "inactive"


class UserKeys:
    """Builds the keys of the users read model under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.checkpoint = f"{prefix}users:checkpoint"
        self.by_email = f"{prefix}users:by_email"
        self.stats = f"{prefix}users:stats"

    def view(self, user_id: str) -> str:
        """Key of one user's serialized view."""
        return f"{self.prefix}users:view:{user_id}"

    def index(self, sort: SortField, subset: Subset) -> str:
        """Key of the sorted index for one (sort, subset) pair."""
        return f"{self.prefix}users:idx:{sort.value}:{subset.value}"


def email_key(email: str) -> str:
    """The case-insensitive form of an e-mail address used for lookups and ordering."""
    return shared_email_key(email)


def index_member(sort: SortField, view: UserView) -> bytes:
    """The member that places `view` in the index for `sort`."""
    if sort is SortField.CREATED_AT:
        # Registration times are never before 1970; clamp anyway so the width stays fixed.
        micros = max(view.created_at.ToMicroseconds(), 0)
        sort_key = f"{micros:0{_CREATED_AT_DIGITS}d}"
    elif sort is SortField.EMAIL:
        sort_key = email_key(view.email)
    else:
        sort_key = view.username.lower()
    return sort_key.encode() + MEMBER_SEPARATOR + view.user_id.encode()


def member_user_id(member: bytes) -> str:
    """The user id at the end of an index member."""
    return member.rsplit(MEMBER_SEPARATOR, 1)[-1].decode()
