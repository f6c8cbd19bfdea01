"""Queries over the users read model (key layout in read_service.keys)."""

from __future__ import annotations

from dataclasses import dataclass

from read_service.keys import SortField, Subset, UserKeys, email_key, index_member
from read_service.view_store import QueryCheckpoint
from read_service.views.base import SearchableViews
from read_service.views.checkpointed import first_read
from read_service.views.paging import PageRequest, Search
from read_service.views.wire import view_bytes, view_field
from tessera.common.v1.money_pb2 import Money
from tessera.users.v1.user_query_service_pb2 import UserView


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


def _spending(amounts: dict[bytes | str, bytes | str]) -> list[Money]:
    # HGETALL of the user's spending hash: minor units per currency code.
    return [
        Money(currency_code=currency, amount_minor=amount)
        for currency, amount in sorted((_as_bytes(c).decode(), int(a)) for c, a in amounts.items())
        if amount
    ]


def _merge_spending(view: UserView, amounts: dict[bytes | str, bytes | str]) -> None:
    view.total_spent.extend(_spending(amounts))


def _field(raw: bytes | str | None, amounts: dict[bytes | str, bytes | str]) -> bytes | None:
    """The stored view with what the user spent, as field 1 of a reply, without parsing the view.

    Appending the serialized `total_spent` entries to the view's bytes is what parsing the view
    and appending them would give (a repeated field's entries add up when bytes are merged).
    """
    if raw is None:
        return None
    spending = _spending(amounts) if amounts else []
    extra = UserView(total_spent=spending).SerializeToString() if spending else b""
    return view_field(_as_bytes(raw) + extra)


def _parse(field: bytes | None) -> UserView | None:
    return None if field is None else UserView.FromString(view_bytes(field))


class UserViews(SearchableViews[UserKeys]):
    """Reads users from Redis; raises the driver's errors for the caller to map."""

    def _keys_of(self, user_id: str) -> tuple[str, str]:
        # The view and what the user spent are kept apart: a write to either drops a cache entry.
        return self._keys.view(user_id), self._keys.spent(user_id)

    async def get(self, user_id: str) -> UserView | None:
        """The user with this canonical id, or None (through the near cache, when there is one)."""
        return _parse(await self.get_field(user_id))

    async def get_field(self, user_id: str) -> bytes | None:
        """Like `get`, as field 1 of a reply (read_service.views.wire)."""
        if self._cache is None:
            return await self._read_field(user_id)
        return await self._cache.get(self._keys_of(user_id), lambda: self._read_field(user_id))

    async def get_at(self, user_id: str, at: QueryCheckpoint) -> UserView | None:
        """Like `get`, also setting `at.position`; a read from Redis takes the checkpoint in the same round trip."""
        return _parse(await self.field_at(user_id, at))

    async def field_at(self, user_id: str, at: QueryCheckpoint) -> bytes | None:
        """Like `get_at`, as field 1 of a reply: the view and what the user spent, without building a message."""
        keys = self._keys_of(user_id)
        cache = self._cache
        if cache is not None:
            hit = at.from_memory(cache, keys[0])
            if hit is not None:
                cached: bytes | None = hit[0]
                return cached
        pipelined = at.pipelined()
        if pipelined is None:
            await at.read()
            return await self.get_field(user_id)
        checkpoint_key, known = pipelined

        async def load() -> tuple[bytes | None, int]:
            read = await self._reader.read(checkpoint_key, *keys)
            position = await at.settle(read.checkpoint, known)
            return _field(read.view, read.hashes[0]), position

        if cache is None:
            field, _ = await load()
        else:
            field, _ = await cache.fill(keys, load)
        return field

    async def _read_field(self, user_id: str) -> bytes | None:
        view_key, spent_key = self._keys_of(user_id)
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.get(view_key)
            pipe.hgetall(spent_key)
            raw, spent = await pipe.execute()
        return _field(raw, spent)

    async def version(self, user_id: str) -> int:
        """The user version the view reflects (0 when there is none); reads the view only."""
        raw = await self._client.get(self._keys.view(user_id))
        return 0 if raw is None else UserView.FromString(_as_bytes(raw)).version

    async def _add_spending(
        self, views: list[UserView], known: dict[str, dict[bytes | str, bytes | str]] | None = None
    ) -> None:
        # What a user has spent is kept apart from the view (payment events name the order,
        # not the user, so the projection cannot read the view when they arrive); merge it here.
        # `known`: what was read with the views already, by user id.
        known = known or {}
        missing = [view for view in views if view.user_id not in known]
        for view in views:
            if view.user_id in known:
                _merge_spending(view, known[view.user_id])
        if not missing:
            return
        async with self._client.pipeline(transaction=False) as pipe:
            for view in missing:
                pipe.hgetall(self._keys.spent(view.user_id))
            spent = await pipe.execute()
        for view, amounts in zip(missing, spent, strict=True):
            _merge_spending(view, amounts)

    async def _views_and_spending(
        self, user_ids: list[str], spent: dict[str, dict[bytes | str, bytes | str]]
    ) -> list[bytes | str | None]:
        """The views of `user_ids` (MGET) and, in the same round trip, what each spent (into `spent`)."""
        if not user_ids:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.mget([self._keys.view(user_id) for user_id in user_ids])
            for user_id in user_ids:
                pipe.hgetall(self._keys.spent(user_id))
            raw_views, *amounts = await pipe.execute()
        spent.update(zip(user_ids, amounts, strict=True))
        return list(raw_views)

    async def get_by_email(self, email: str) -> UserView | None:
        """The user with this e-mail address (any case), or None."""
        return _parse(await self.field_by_email(email))

    async def field_by_email(self, email: str, at: QueryCheckpoint | None = None) -> bytes | None:
        """Like `get_by_email`, as field 1 of a reply; `at`'s checkpoint is read with the e-mail lookup."""
        (user_id,) = await first_read(self._client, at, lambda pipe: pipe.hget(self._keys.by_email, email_key(email)))
        if user_id is None:
            return None
        return await self.get_field(_as_bytes(user_id).decode())

    async def list_page(self, query: ListUsersQuery, at: QueryCheckpoint | None = None) -> UserPage:
        """One page in index order, starting after the query's cursor; `at`'s checkpoint is read with the first read.

        Without a search every index member is a hit. A search term that the trigram index
        narrows to few candidates is answered from those, with full pages; a short or common
        term by the filtered scan, which reads at most `scan_limit` members per call and may
        give a short page with a next cursor (read_service.views.paging).
        """
        request = PageRequest(
            index=self._keys.index(query.sort, query.subset),
            descending=query.descending,
            cursor=query.cursor,
            page_size=query.page_size,
            view_key=self._keys.view,
            parse=UserView.FromString,
            matches=lambda view: _matches(view, query),
            member_of=lambda view: index_member(query.sort, view),
            filtered=bool(query.search),
        )
        spent: dict[str, dict[bytes | str, bytes | str]] = {}
        if query.search:
            ranked = query.sort is SortField.CREATED_AT
            page = await self._pager.search(request, Search(query.search, self._keys.trigram, ranked), at)
        else:
            # Every member with a view is a hit: its spending comes in the views' round trip.
            page = await self._pager.scan(request, at, read=lambda ids: self._views_and_spending(ids, spent))
        await self._add_spending(page.views, spent)
        return UserPage(page.views, page.next_cursor)
