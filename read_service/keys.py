"""The Redis key layout of the read models, in one place for the projections and the queries.

The users read model is laid out here; the catalog and orders read models at the end of
this module (CatalogKeys, OrderKeys).

Every key starts with the deployment's `redis_key_prefix` (written `P` below):

    P users:checkpoint                  string  last event-log position applied to these views
    P users:view:<user id>              string  serialized tessera.users.v1.UserView
    P users:by_email                    hash    lower-cased e-mail -> user id
    P users:stats                       hash    `users` and `active_users` counters
    P users:idx:<sort>:<subset>         zset    one member per user, every score 0, ordered by member
    P users:order:<order id>            string  the order's customer, currency, total and paid flag
                                                (see projections.users.OrderNote)
    P users:spent:<user id>             hash    currency -> minor units paid and not refunded
    P users:tri:<trigram>               zset    ids of the users whose case-folded e-mail, username
                                                or full name holds the trigram (each id's 16 bytes),
                                                each scored by its creation time in microseconds
                                                (read_service.search)

`<sort>` is `created_at`, `email` or `username`; `<subset>` is `all`, `active` or `inactive`,
so that every (sort, filter) pair of ListUsers reads one index in order. A member is the sort
key followed by NUL and the user id, so that lexicographic order (ZRANGE BYLEX) is the sort
order tie-broken by id, and the member itself is an exact keyset cursor.

The apply script (apply_events.lua) is given every key it writes, and a replica's key spaces
are generations (read_service.generations) whose prefix carries a hash tag per projection, so
that each script call touches one Redis Cluster slot. A prefix without a tag (tests that build
keys on a bare prefix) keeps the keys on one node instead.
"""

from __future__ import annotations

from enum import StrEnum

from shared_kernel.contracts.identity import email_key as shared_email_key
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

    def order(self, order_id: str) -> str:
        """Key of the users projection's own note of an order: customer, total and whether it is paid."""
        return f"{self.prefix}users:order:{order_id}"

    def spent(self, user_id: str) -> str:
        """Key of the hash of what a user has paid and not been refunded: currency -> minor units."""
        return f"{self.prefix}users:spent:{user_id}"

    def trigram(self, gram: str) -> str:
        """Key of the search index sorted set of one trigram: the users whose fields hold it, by creation time."""
        return f"{self.prefix}users:tri:{gram}"


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


# -- catalog ---------------------------------------------------------------------------------
#
#     P catalog:checkpoint                string  last event-log position applied to these views
#     P catalog:view:<product id>         string  serialized tessera.catalog.v1.ProductView
#     P catalog:idx:all                   zset    every product, member lower(sku) NUL product id
#     P catalog:idx:active                zset    the products not discontinued, same members


class CatalogKeys:
    """Builds the keys of the catalog read model under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.checkpoint = f"{prefix}catalog:checkpoint"

    def view(self, product_id: str) -> str:
        """Key of one product's serialized view."""
        return f"{self.prefix}catalog:view:{product_id}"

    def index(self, include_discontinued: bool) -> str:
        """Key of the sku-ordered index with or without discontinued products."""
        return f"{self.prefix}catalog:idx:{'all' if include_discontinued else 'active'}"


def product_member(sku: str, product_id: str) -> bytes:
    """The member that places a product in the catalog indexes: sku order, case-insensitively."""
    return sku.lower().encode() + MEMBER_SEPARATOR + product_id.encode()


# -- orders ----------------------------------------------------------------------------------
#
#     P orders:checkpoint                 string  last event-log position applied to these views
#     P orders:view:<order id>            string  serialized tessera.orders.v1.OrderView
#     P orders:customer:<customer id>     zset    the customer's orders, member placed_at NUL order id
#     P orders:idx:<sort>                 zset    every order, member <sort key> NUL order id, for
#                                                 SearchOrders; <sort> is placed_at, total or updated_at
#     P orders:stats:<currency>:<day>     hash    the figures of orders placed that UTC day (YYYY-MM-DD)
#                                                 in that currency: `placed`, `status:<STATUS>`,
#                                                 `paid`, `revenue`, `qty:<sku>`, `name:<sku>`
#     P orders:tri:<trigram>              zset    ids of the orders whose case-folded customer name,
#                                                 customer e-mail, line skus or product names hold
#                                                 the trigram (each id's 16 bytes), each scored by
#                                                 its placing time in microseconds (read_service.search)
#
# Times and amounts in members are zero-padded decimal (microseconds since the epoch, minor
# units), so that byte order is numeric order and members are exact keyset cursors.


class OrderSortField(StrEnum):
    """The orders SearchOrders offers; each value names an index in the key layout."""

    PLACED_AT = "placed_at"
    TOTAL = "total"
    UPDATED_AT = "updated_at"


class OrderKeys:
    """Builds the keys of the orders read model under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.checkpoint = f"{prefix}orders:checkpoint"

    def view(self, order_id: str) -> str:
        """Key of one order's serialized view."""
        return f"{self.prefix}orders:view:{order_id}"

    def by_customer(self, customer_id: str) -> str:
        """Key of one customer's orders, in placing order."""
        return f"{self.prefix}orders:customer:{customer_id}"

    def index(self, sort: OrderSortField) -> str:
        """Key of the index of every order for one sort."""
        return f"{self.prefix}orders:idx:{sort.value}"

    def stats(self, currency_code: str, day: str) -> str:
        """Key of the figures of one (currency, UTC day)."""
        return f"{self.prefix}orders:stats:{currency_code}:{day}"

    def trigram(self, gram: str) -> str:
        """Key of the search index sorted set of one trigram: the orders whose texts hold it, by placing time."""
        return f"{self.prefix}orders:tri:{gram}"


def padded(value: int) -> str:
    """A non-negative integer as fixed-width decimal, so that byte order is numeric order."""
    return f"{max(value, 0):0{_CREATED_AT_DIGITS}d}"


def keyed_member(sort_key: int, entity_id: str) -> bytes:
    """An index member: the padded sort key, NUL, the id."""
    return padded(sort_key).encode() + MEMBER_SEPARATOR + entity_id.encode()


def member_id(member: bytes) -> str:
    """The id at the end of any index member."""
    return member.rsplit(MEMBER_SEPARATOR, 1)[-1].decode()
