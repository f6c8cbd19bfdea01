"""What the query services share beyond the freshness contract: single views, pages and watches.

- `SingleViewQuery` answers GetUser, GetProduct and GetOrder: one view by id as the reply's
  bytes (read_service.views.wire). A query without a consistency token whose view the near
  cache holds is answered at once from memory (`Freshness.from_memory`); every other one goes
  through `Freshness.answer_at`.
- `answer_page` is one page of a list query and the page token of the next one.
- `watch_one` streams one view's changes (WatchUser, WatchOrder).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

from read_service.consistency import token_for
from read_service.entrypoints.freshness import Context, Freshness
from read_service.page_tokens import PageTokenCodec
from read_service.view_store import QueryCheckpoint
from read_service.views.wire import reply_tail, view_bytes
from read_service.watch import Change
from shared_kernel.contracts import errors
from shared_kernel.contracts.validation import canonical_uuid, parse_uuid

T = TypeVar("T")
R = TypeVar("R")


class SingleViews(Protocol):
    """The reads of one view by id, as field 1 of a reply."""

    def cached_field(self, view_id: str, at: QueryCheckpoint, /) -> tuple[bytes | None] | None:
        """`(field,)` from the near cache at the projector's checkpoint; None on a miss."""

    async def field_at(self, view_id: str, at: QueryCheckpoint, /) -> bytes | None:
        """The view (None when absent), reading the checkpoint in the same round trip."""


class Versioned(Protocol):
    """A parsed view message."""

    @property
    def version(self) -> int:
        """The aggregate version the view reflects."""


class SingleViewQuery:
    """One view by id answered as a serialized reply `{1: view, 2: stale, 3: view_position}`."""

    def __init__(
        self,
        views: SingleViews,
        freshness: Freshness,
        *,
        aggregate_type: str,
        id_field: str,
        parse: Callable[[bytes], Versioned],
    ) -> None:
        self._views = views
        self._freshness = freshness
        self._aggregate_type = aggregate_type
        self._id_field = id_field
        self._parse = parse
        # The reply tail of the last position answered from memory: positions move far less often than calls.
        self._tail = (-1, b"")

    def field_version(self, field: bytes | None) -> int:
        """The aggregate version in a reply's view field (0 when there is no view)."""
        return 0 if field is None else self._parse(view_bytes(field)).version

    async def answer(self, view_id: str, token: str, max_wait_ms: int, context: Context) -> bytes:
        """The reply's bytes; NotFound when there is no such view."""
        view_id = canonical_uuid(self._id_field, view_id)
        views = self._views
        missed = False
        if not token:
            hit = self._freshness.from_memory(views.cached_field, view_id)
            if hit:
                field, position = hit
                if field is None:
                    raise errors.NotFound(f"{self._aggregate_type} {view_id} not found")
                at, tail = self._tail
                if at != position:
                    tail = reply_tail(False, position)
                    self._tail = (position, tail)
                return field + tail
            # () : the near cache was asked and missed, so Redis is read without asking it again.
            missed = hit is not None
        field, stale, position = await self._freshness.answer_at(
            context,
            token_for(self._aggregate_type, token),
            max_wait_ms,
            lambda at: views.field_at(view_id, at),
            peek=None if missed else lambda at: views.cached_field(view_id, at),
            version=self.field_version,
            aggregate_id=view_id,
        )
        if field is None:
            raise errors.NotFound(f"{self._aggregate_type} {view_id} not found")
        return field + reply_tail(stale, position)


class Paged(Protocol):
    """A list query: what its page token is bound to."""

    def binding(self) -> bytes:
        """The query's parameters a page token must match."""


class Page(Protocol):
    """A page read from the views."""

    @property
    def next_cursor(self) -> bytes | None:
        """Where the next page starts (None: this is the last one)."""


P = TypeVar("P", bound=Page)


async def answer_page(
    freshness: Freshness,
    tokens: PageTokenCodec,
    context: Context,
    *,
    aggregate_type: str,
    consistency_token: str,
    max_wait_ms: int,
    query: Paged,
    read: Callable[[QueryCheckpoint], Awaitable[P]],
) -> tuple[P, str, bool, int]:
    """One page of a list query: the page, the next page's token ("" after the last), stale, view position."""
    page, stale, position = await freshness.answer_at(
        context, token_for(aggregate_type, consistency_token), max_wait_ms, read
    )
    next_token = "" if page.next_cursor is None else tokens.issue(query.binding(), page.next_cursor)
    return page, next_token, stale, position


class WatchRequest(Protocol):
    """WatchUserRequest, WatchOrderRequest: the view's id (in a field of its own name) and `after_position`."""

    after_position: int

    def HasField(self, field_name: Any, /) -> bool:
        """Whether an optional field is set."""


async def watch_one(
    freshness: Freshness,
    watch: Callable[[str, int | None], AsyncIterator[Change]] | None,
    request: WatchRequest,
    id_field: str,
    reply: Callable[[bytes | None, int], R],
) -> AsyncIterator[R]:
    """One view's changes as replies: `reply(view bytes, or None while it does not exist, position)` for each.

    With the request's `after_position`, each change after it instead of the view now.
    """
    view_id = str(parse_uuid(id_field, getattr(request, id_field)))
    after = request.after_position if request.HasField("after_position") else None
    freshness.require_ready()
    if watch is None:
        raise errors.Unavailable("this replica does not serve watches")
    async for change in watch(view_id, after):
        yield reply(change.value, change.position)
