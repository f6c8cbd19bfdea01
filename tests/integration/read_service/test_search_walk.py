"""The ordered walk of a term's trigram sets (read_service.search, search_walk.lua) on a real Redis.

The sets are written directly: a rare term over a large rarest set (30,000 ids, one in 600 in
the other set), ranks that tie, pages in both directions, a placing window, filters, a cursor
whose entity is gone, walks longer than one script call.
"""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis

from read_service import search
from read_service.keys import keyed_member
from read_service.views.paging import IndexPager, Page, PageRequest, Search

pytestmark = pytest.mark.integration

RAREST = 30_000
EVERY = 600


def _id(n: int) -> str:
    # Canonical ids whose order is n's order.
    return str(uuid.UUID(int=n + 1))


def _rank(n: int) -> int:
    return 1_700_000_000_000_000 + n // 3  # three ids per rank: ties are ordered by id


class World:
    def __init__(self, client: aioredis.Redis, redis_prefix: str) -> None:
        self.client = client
        self.space = f"{redis_prefix}{{walk}}:"
        self.hits = [n for n in range(RAREST) if n % EVERY == 7]
        self.gone: set[str] = set()
        # Hits the query's filter drops (as a status or subset filter would).
        self.dropped = {_id(n).encode() for n in self.hits[::3]}

    def key(self, gram: str) -> str:
        # "abcd": "abc" is the rarest set, "bcd" the other; any other gram is an empty set.
        return f"{self.space}tri:{gram}"

    def view_key(self, entity_id: str) -> str:
        return f"{self.space}view:{entity_id}"

    async def seed(self) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for start in range(0, RAREST, 5_000):
                pipe.zadd(self.key("abc"), {search.member(_id(n)): _rank(n) for n in range(start, start + 5_000)})
            # The other set holds the hits and many ids that are not in the rarest set.
            pipe.zadd(self.key("bcd"), {search.member(_id(n)): _rank(n) for n in self.hits})
            pipe.zadd(self.key("bcd"), {search.member(_id(RAREST + n)): n for n in range(50_000)})
            for n in self.hits:
                pipe.set(self.view_key(_id(n)), keyed_member(_rank(n), _id(n)))
            await pipe.execute()

    def request(
        self, cursor: bytes | None, descending: bool, low: bytes = b"-", high: bytes = b"+"
    ) -> PageRequest[bytes]:
        return PageRequest(
            index=f"{self.space}unused",
            descending=descending,
            cursor=cursor,
            page_size=7,
            view_key=self.view_key,
            parse=bytes,
            matches=lambda view: view.rsplit(b"\x00", 1)[-1] not in self.dropped,
            member_of=lambda view: view,
            filtered=True,
            low=low,
            high=high,
        )

    async def pages(
        self, descending: bool, low: bytes = b"-", high: bytes = b"+", pager: IndexPager | None = None
    ) -> list[list[bytes]]:
        pager = pager or IndexPager(self.client, scan_limit=5_000, candidate_limit=5_000)
        pages: list[list[bytes]] = []
        cursor: bytes | None = None
        while True:
            page: Page[bytes] = await pager.search(
                self.request(cursor, descending, low, high), Search("ABCD", self.key, ranked=True), None
            )
            pages.append(page.views)
            cursor = page.next_cursor
            if cursor is None:
                return pages


def expected(world: World, descending: bool) -> list[bytes]:
    members = [keyed_member(_rank(n), _id(n)) for n in world.hits if _id(n) not in world.gone]
    kept = [m for m in members if m.rsplit(b"\x00", 1)[-1] not in world.dropped]
    return sorted(kept, reverse=descending)


@pytest.fixture
async def world(redis_client: aioredis.Redis, redis_prefix: str) -> World:
    seeded = World(redis_client, redis_prefix)
    await seeded.seed()
    return seeded


@pytest.mark.parametrize("descending", [False, True])
async def test_a_rare_term_over_a_large_set_gives_full_pages_in_rank_order(world: World, descending: bool) -> None:
    want = expected(world, descending)
    assert 20 < len(want) < len(world.hits)  # the filter drops some hits
    pages = await world.pages(descending)
    assert all(len(page) == 7 for page in pages[:-1]) and 0 < len(pages[-1]) <= 7
    assert [m for page in pages for m in page] == want


async def test_a_window_and_a_vanished_cursor_entity_keep_the_walk_in_place(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Short steps: each page takes several script calls, each resuming where the last stopped.
    monkeypatch.setattr(search, "WALK_BUDGET", 700)
    first = await world.pages(False)
    # The entity of a page's last member is gone before the next page is asked for.
    pager = IndexPager(world.client, scan_limit=5_000, candidate_limit=5_000)
    cursor = first[0][-1]
    entity = cursor.rsplit(b"\x00", 1)[-1].decode()
    await world.client.delete(world.view_key(entity))
    world.gone.add(entity)
    page = await pager.search(world.request(cursor, False), Search("abcd", world.key, ranked=True), None)
    assert page.views == expected(world, False)[6:13]
    # A window of ranks (the sort index's BYLEX bounds): `[` from inclusive, `(` to exclusive.
    low_n, high_n = world.hits[5], world.hits[30]
    low = b"[" + keyed_member(_rank(low_n), "").rstrip(b"\x00")
    high = b"(" + keyed_member(_rank(high_n), "").rstrip(b"\x00")
    inside = [m for m in expected(world, True) if low[1:] <= m < high[1:]]
    pages = await world.pages(True, low, high)
    assert [m for page in pages for m in page] == inside and all(len(p) == 7 for p in pages[:-1])
    assert len(inside) > 14


@pytest.mark.parametrize("descending", [False, True])
async def test_a_walk_of_sets_over_the_probe_bound_reads_a_budget_per_call(world: World, descending: bool) -> None:
    # The rarest set (30,000 ids) is over the probe bound: the walk reads at most the scan's
    # budget per call (about two hits per 1,000 ids here), so pages may be short, each with a
    # cursor that resumes the walk where it stopped, and together they hold every hit in order.
    pager = IndexPager(world.client, scan_limit=1_000, candidate_limit=10)
    assert RAREST > 10 * search.PROBE_FACTOR
    pages = await world.pages(descending, pager=pager)
    assert [m for page in pages for m in page] == expected(world, descending)
    assert any(len(page) < 7 for page in pages[:-1]) and all(len(page) <= 7 for page in pages)
    assert len(pages) >= RAREST // 1_000
