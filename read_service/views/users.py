"""Queries over the users read model (key layout in read_service.keys)."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from read_service.keys import SortField, Subset, UserKeys, email_key, member_user_id
from tessera.users.v1.user_query_service_pb2 import UserView

# Index members read per round trip while a search filters them.
_SEARCH_CHUNK = 256


@dataclass(frozen=True, slots=True)
class ListUsersQuery:
    """One page request of ListUsers, validated and normalized."""

    page_size: int
    sort: SortField = SortField.CREATED_AT
    descending: bool = False
    subset: Subset = Subset.ALL
    # Case-folded substring to look for; empty means no search.
    search: str = ""
    # Keyset cursor: the index member of the last user the previous page covered.
    cursor: bytes | None = None

    def binding(self) -> bytes:
        """What a page token for this query is bound to: everything but the size and cursor."""
        direction = "desc" if self.descending else "asc"
        return f"users.list|{self.sort.value}|{direction}|{self.subset.value}|{self.search}".encode()


@dataclass(frozen=True, slots=True)
class UserPage:
    """One page of users and the cursor to continue after it (None on the last page)."""

    users: list[UserView]
    next_cursor: bytes | None


def _as_bytes(value: bytes | str) -> bytes:
    # The client is built without decode_responses, so replies are bytes; the driver's
    # types admit str as well.
    return value if isinstance(value, bytes) else value.encode()


def _matches(view: UserView, query: ListUsersQuery) -> bool:
    # The index already holds only the right subset; checking again keeps a page right when
    # a user is deactivated between reading the index and reading the views.
    if query.subset is Subset.ACTIVE and not view.active:
        return False
    if query.subset is Subset.INACTIVE and view.active:
        return False
    if not query.search:
        return True
    needle = query.search
    return any(needle in text.casefold() for text in (view.email, view.username, view.full_name))


class UserViews:
    """Reads users from Redis; raises the driver's errors for the caller to map."""

    def __init__(self, client: aioredis.Redis, keys: UserKeys, scan_limit: int = 5000) -> None:
        self._client = client
        self._keys = keys
        self._scan_limit = scan_limit

    async def get(self, user_id: str) -> UserView | None:
        """The user with this canonical id, or None."""
        raw = await self._client.get(self._keys.view(user_id))
        return None if raw is None else UserView.FromString(_as_bytes(raw))

    async def get_by_email(self, email: str) -> UserView | None:
        """The user with this e-mail address (any case), or None."""
        user_id = await self._client.hget(self._keys.by_email, email_key(email))
        if user_id is None:
            return None
        return await self.get(_as_bytes(user_id).decode())

    async def list_page(self, query: ListUsersQuery) -> UserPage:
        """One page in index order, starting after the query's cursor.

        Without a search every index member is a hit. With one, members are read in chunks
        and filtered here; at most `scan_limit` members are read per call, so a rare search
        term may give a short (even empty) page with a next cursor: callers follow tokens
        until none is returned.
        """
        index = self._keys.index(query.sort, query.subset)
        wanted = query.page_size + 1  # one more than a page tells whether another page exists
        # Without a search every member is a hit, so only a search needs a budget.
        budget = self._scan_limit if query.search else None
        chunk = max(wanted, _SEARCH_CHUNK) if query.search else wanted
        hits: list[tuple[bytes, UserView]] = []
        cursor = query.cursor
        scanned = 0
        exhausted = False
        while len(hits) < wanted:
            count = chunk if budget is None else min(chunk, budget - scanned)
            members = await self._range(index, cursor, query.descending, count)
            raw_views = await self._client.mget([self._keys.view(member_user_id(m)) for m in members])
            for member, raw in zip(members, raw_views, strict=True):
                scanned += 1
                cursor = member
                if raw is None:
                    continue
                view = UserView.FromString(_as_bytes(raw))
                if _matches(view, query):
                    hits.append((member, view))
                    if len(hits) == wanted:
                        break
            if len(members) < count:
                exhausted = True
                break
            if budget is not None and scanned >= budget:
                break
        if len(hits) == wanted:
            page = hits[:-1]
            return UserPage([view for _, view in page], page[-1][0] if page else cursor)
        if exhausted:
            return UserPage([view for _, view in hits], None)
        # The scan budget ran out first: resume after the last member read.
        return UserPage([view for _, view in hits], cursor)

    async def _range(self, index: str, cursor: bytes | None, descending: bool, count: int) -> list[bytes]:
        if descending:
            high = b"(" + cursor if cursor is not None else b"+"
            members = await self._client.zrange(index, high, b"-", desc=True, bylex=True, offset=0, num=count)
        else:
            low = b"(" + cursor if cursor is not None else b"-"
            members = await self._client.zrange(index, low, b"+", bylex=True, offset=0, num=count)
        # BYLEX without scores answers a flat list of members.
        return [m for m in members if isinstance(m, bytes)]
