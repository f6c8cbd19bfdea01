"""Pages of a list query: an ordered scan of a sort index, or the candidates of a search term.

Both list queries that search (ListUsers and SearchOrders) and the plain listings page the
same way: keyset pages over a sort index whose members are `<sort key> NUL <id>` (score 0,
read BYLEX), each member's view read with MGET and kept when the query's filters match it.
The cursor is always such a member, so a page token does not depend on how a page was found.

A search term that the trigram index narrows to few candidates (read_service.search) is
answered from them instead:

- walked: when the query is in the order that scores the trigram sets (users by creation,
  orders by placing time), the term's rarest trigram set is walked in that order from the
  cursor, each id checked in the other sets, until a page's worth of candidates is found;
  only their views are read (and more, if some of them do not match);
- otherwise every candidate's view is read, the matching ones ordered by their member and
  paged after the cursor.

A short or common term is answered by the scan, which fills pages quickly precisely because
the term is common; at most `scan_limit` members are read per call, so a filtered scan may
give a short page with a next cursor.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from read_service.keys import MEMBER_SEPARATOR, keyed_member, member_id
from read_service.search import Position, Walker, candidates, rank_of
from read_service.view_store import QueryCheckpoint
from read_service.views.checkpointed import first_read

V = TypeVar("V")

# Index members read per round trip while a filter is applied.
SCAN_CHUNK = 256
# Views read per MGET while candidates are checked.
CANDIDATE_CHUNK = 500

Raw = bytes | str | None


@dataclass(frozen=True, slots=True)
class PageRequest(Generic[V]):
    """What one page reads: the sort index and its bounds, and how a view is found, parsed and kept."""

    index: str
    descending: bool
    cursor: bytes | None
    page_size: int
    view_key: Callable[[str], str]
    parse: Callable[[bytes], V]
    matches: Callable[[V], bool]
    # The member that places a view in `index`.
    member_of: Callable[[V], bytes]
    # Whether some members fail `matches`: only then does the scan need a budget.
    filtered: bool
    low: bytes = b"-"
    high: bytes = b"+"


@dataclass(frozen=True, slots=True)
class Search:
    """A search term and the keys of its projection's index."""

    term: str
    trigram_key: Callable[[str], str]
    # Whether the query is in rank order (the default sort key, which scores the trigram sets):
    # the sets are then walked in page order; a query in another order reads every candidate's view.
    ranked: bool = False


@dataclass(frozen=True, slots=True)
class Page(Generic[V]):
    """The views of one page, in order, and the cursor to continue after it (None on the last page)."""

    views: list[V]
    next_cursor: bytes | None


def _as_bytes(raw: bytes | str) -> bytes:
    # The client is built without decode_responses; the driver's types admit str as well.
    return raw if isinstance(raw, bytes) else raw.encode()


def after(members: list[bytes], cursor: bytes | None, descending: bool) -> list[bytes]:
    """`members` in index order (members compare as Redis BYLEX does), from just after `cursor`."""
    if cursor is not None:
        members = [m for m in members if (m < cursor if descending else m > cursor)]
    return sorted(members, reverse=descending)


class IndexPager:
    """Reads pages of views through a sort index or the search index; raises the driver's errors."""

    def __init__(self, client: aioredis.Redis, scan_limit: int, candidate_limit: int) -> None:
        self._client = client
        self._scan_limit = scan_limit
        # A search with more candidates than this scans the sort index instead (read_service.search).
        self._candidate_limit = candidate_limit
        self._walker = Walker(client)

    async def search(self, request: PageRequest[V], search: Search, at: QueryCheckpoint | None) -> Page[V]:
        """One page of the views that match `request` and contain the search term."""
        plan = await candidates(
            self._client, search.trigram_key, search.term, self._candidate_limit, at, ranked=search.ranked
        )
        if plan.walk is not None:
            return await self._walked_page(request, plan.walk, max(self._scan_limit, 1) if plan.bounded else None)
        if plan.ids is None:
            return await self.scan(request, None if plan.checkpoint_read else at)
        return await self._candidate_page(request, plan.ids)

    async def scan(
        self,
        request: PageRequest[V],
        at: QueryCheckpoint | None,
        read: Callable[[list[str]], Awaitable[list[Raw]]] | None = None,
    ) -> Page[V]:
        """One page read from the sort index in order, each view filtered here; `read` reads views by id."""
        read_views = read or self._mget_ids(request)
        wanted = request.page_size + 1  # one more than a page tells whether another page exists
        budget = self._scan_limit if request.filtered else None
        chunk = max(wanted, SCAN_CHUNK) if request.filtered else wanted
        hits: list[tuple[bytes, V]] = []
        cursor = request.cursor
        scanned = 0
        exhausted = False
        while len(hits) < wanted:
            count = chunk if budget is None else min(chunk, budget - scanned)
            members = await self._range(request, cursor, count, at)
            at = None
            raws = await read_views([member_id(m) for m in members]) if members else []
            for member, raw in zip(members, raws, strict=True):
                scanned += 1
                cursor = member
                if raw is None:
                    continue
                view = request.parse(_as_bytes(raw))
                if request.matches(view):
                    hits.append((member, view))
                    if len(hits) == wanted:
                        break
            if len(members) < count:
                exhausted = True
                break
            if budget is not None and scanned >= budget:
                break
        if len(hits) == wanted:
            return _full(hits)
        # Exhausted: the last page. Otherwise the budget ran out first: resume after the last member read.
        return Page([view for _, view in hits], None if exhausted else cursor)

    async def _walked_page(self, request: PageRequest[V], keys: list[str], budget: int | None) -> Page[V]:
        """A page from the walk of the term's trigram sets in rank order: Redis reads as far as the page reaches.

        With a `budget` (a common term), at most that many ids of the rarest set are read: the
        page may then be short, with the last id read as the next cursor, as in the scan.
        """
        wanted = request.page_size + 1
        position, stop = _walk_bounds(request)
        hits: list[tuple[bytes, V]] = []
        walked = 0
        while True:
            needed = wanted - len(hits)
            left = None if budget is None else budget - walked
            step = await self._walker.step(keys, position, stop, needed, descending=request.descending, budget=left)
            walked += step.walked
            used = step.found[:needed]
            done = step.done and len(used) == len(step.found)
            if len(used) < len(step.found):
                # Found more than the page needs: go on after the last one used, not after the walk.
                rank, entity_id = used[-1]
                position = Position(str(rank), entity_id)
            else:
                position = step.position
            placed = [(keyed_member(rank, entity_id), entity_id) for rank, entity_id in used]
            inside = [(member, entity_id) for member, entity_id in placed if _within(member, request)]
            raws = await self._client.mget([request.view_key(entity_id) for _, entity_id in inside]) if inside else []
            for raw in raws:
                if raw is None:
                    continue
                view = request.parse(_as_bytes(raw))
                if request.matches(view):
                    hits.append((request.member_of(view), view))
            if len(hits) == wanted:
                return _full(hits)
            if done:
                return Page([view for _, view in hits], None)
            if budget is not None and walked >= budget:
                # The last id walked is where the next page resumes (a budget of at least one
                # id walks one, so there is one).
                cursor = keyed_member(rank_of(position), position.after_id) if position.after_id else None
                return Page([view for _, view in hits], cursor)

    async def _candidate_page(self, request: PageRequest[V], ids: list[str]) -> Page[V]:
        """A page from unranked candidates: every view read and checked, then ordered by its member."""
        hits: dict[bytes, V] = {}
        keys = [request.view_key(entity_id) for entity_id in ids]
        for start in range(0, len(keys), CANDIDATE_CHUNK):
            for raw in await self._client.mget(keys[start : start + CANDIDATE_CHUNK]):
                if raw is None:
                    continue
                view = request.parse(_as_bytes(raw))
                if request.matches(view):
                    hits[request.member_of(view)] = view
        wanted = request.page_size + 1
        page = [(member, hits[member]) for member in after(list(hits), request.cursor, request.descending)[:wanted]]
        if len(page) == wanted:
            return _full(page)
        return Page([view for _, view in page], None)

    def _mget_ids(self, request: PageRequest[V]) -> Callable[[list[str]], Awaitable[list[Raw]]]:
        async def read(ids: list[str]) -> list[Raw]:
            return list(await self._client.mget([request.view_key(entity_id) for entity_id in ids]))

        return read

    async def _range(
        self, request: PageRequest[V], cursor: bytes | None, count: int, at: QueryCheckpoint | None
    ) -> list[bytes]:
        def queue(pipe: Pipeline) -> None:
            if request.descending:
                start = b"(" + cursor if cursor is not None else request.high
                pipe.zrange(request.index, start, request.low, desc=True, bylex=True, offset=0, num=count)
            else:
                start = b"(" + cursor if cursor is not None else request.low
                pipe.zrange(request.index, start, request.high, bylex=True, offset=0, num=count)

        (members,) = await first_read(self._client, at, queue)
        # BYLEX without scores answers a flat list of members.
        return [m for m in members if isinstance(m, bytes)]


def _within(member: bytes, request: PageRequest[V]) -> bool:
    """Whether `member` lies between the request's BYLEX bounds (`-`, `+`, `[x` or `(x`)."""
    low, high = request.low, request.high
    if low != b"-" and (member < low[1:] if low[:1] == b"[" else member <= low[1:]):
        return False
    return high == b"+" or (member <= high[1:] if high[:1] == b"[" else member < high[1:])


def _walk_bounds(request: PageRequest[V]) -> tuple[Position, str]:
    """Where the walk of a ranked page starts (after the cursor, within the bounds) and the rank it stops at.

    The bounds give ranks inclusive of every member within them (members are checked
    exactly by `_within`); the walk starts at the cursor's member or the near bound,
    whichever comes later in the walk's direction.
    """
    low, high = _bound_rank(request.low), _bound_rank(request.high)
    near, far = (high, low) if request.descending else (low, high)
    edge = ("+inf", "-inf") if request.descending else ("-inf", "+inf")
    start = Position(edge[0] if near is None else str(near))
    if request.cursor is not None:
        key, _, entity_id = request.cursor.partition(MEMBER_SEPARATOR)
        rank = int(key)
        if near is None or (rank <= near if request.descending else rank >= near):
            start = Position(str(rank), entity_id.decode())
    return start, edge[1] if far is None else str(far)


def _bound_rank(bound: bytes) -> int | None:
    """The rank of a BYLEX bound's member (`[x` or `(x`, x a padded rank, maybe with an id), None for `-`/`+`."""
    if bound in (b"-", b"+"):
        return None
    return int(bound[1:].partition(MEMBER_SEPARATOR)[0])


def _full(hits: list[tuple[bytes, V]]) -> Page[V]:
    """`hits` holds one more than a page: the page, and its last member as the next cursor."""
    page = hits[:-1]
    return Page([view for _, view in page], page[-1][0])
