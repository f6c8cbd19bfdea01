"""The trigram search index: which entities a search term may match, without reading every view.

A projection keeps one Redis sorted set per trigram (three consecutive characters of a
case-folded searchable field) in its own key space, holding the ids of the entities whose
fields contain that trigram, each scored by the entity's rank: its default sort key, creation
or placing time in microseconds (read_service.keys: `users:tri:<gram>`, `orders:tri:<gram>`).
A member is the id's 16 bytes (`member`), not its 36-character text: the sets are most of the
index's memory, and byte order of the 16 bytes is the order of the canonical text, so ties
of rank still come out in the sort index's order.
The sets are written by the projection's ops, in the same apply script call as the views, so
they follow the views through checkpoints, generations (rebuilds), upcasting and parking
without code of their own.

A query for a term of at least three characters reads the cardinality of each of its trigram
sets. Every entity whose fields contain the term is in the smallest (a substring's trigrams
are all trigrams of the field that contains it):

- for a query in rank order (users by creation, orders by placing time), the rarest set is
  walked in that order from the page's cursor and each id looked up in the other sets
  (search_walk.lua), only until a page of candidates is found; the work follows the page and
  the density of the term, not the size of the sets. When even the rarest set is larger than
  a few times `limit` (a common term), the walk reads at most the scan's budget of ids per
  call and may give a short page with a next cursor, as the scan does;
- for another order, when the smallest set is at most a few times `limit`, the intersection
  (at most `limit` ids) is the candidate list; every candidate's view is read, ordered by the
  requested sort and paged.

The caller checks each candidate's view with the term and the filters
(read_service.views.paging). A shorter term, or a common one in another order (more
candidates), is answered by the ordered scan of the sort index instead, which fills pages
fast precisely because the term is common. See docs/decisions/0037-search-index.md.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from read_service.view_store import QueryCheckpoint
from read_service.views.checkpointed import first_read

# Characters per gram. Shorter terms cannot use the index.
GRAM = 3
# Default size of the rarest trigram set above which a term is scanned rather than looked up.
DEFAULT_CANDIDATE_LIMIT = 2000
# A term whose rarest trigram set is larger than the candidate limit, but not more than this
# many times larger, is still walked or intersected: its trigrams may each be common while
# together they are rare (a prefix such as "emma.wilson1"). Only a larger set is scanned.
# Walking or intersecting costs at most about one lookup per other set per id of the rarest
# set; what bounds the factor is a term with no hit (walked to the end) or a common one.
PROBE_FACTOR = 10
# Ids of the rarest trigram set one walk step reads at most: bounds how long one script call
# holds Redis; a longer walk takes several calls.
WALK_BUDGET = 4096
# Ids one range call of the walk reads at first (the script doubles it up to 1,024).
WALK_CHUNK = 32

_WALK_SCRIPT = resources.files("read_service").joinpath("search_walk.lua").read_text(encoding="utf-8")


def grams(texts: Iterable[str]) -> set[str]:
    """The trigrams of each case-folded text (none spans two texts)."""
    found: set[str] = set()
    for text in texts:
        folded = text.casefold()
        found.update(folded[i : i + GRAM] for i in range(len(folded) - GRAM + 1))
    return found


def member(entity_id: str) -> bytes:
    """An entity's member in the trigram sets: the 16 bytes of its canonical id."""
    return uuid.UUID(entity_id).bytes


def entity_of(raw: bytes | str) -> str:
    """The canonical id of a trigram set member."""
    data = raw if isinstance(raw, bytes) else raw.encode("latin-1")
    return str(uuid.UUID(bytes=data))


def gram_ops(
    key_of: Callable[[str], str],
    entity_id: str,
    before: set[str],
    after: set[str],
    rank: int,
    *,
    rank_changed: bool = False,
) -> list[tuple[str | bytes | int, ...]]:
    """The writes that move an entity from the trigrams `before` to `after` (in a stable order).

    Each trigram set is a sorted set scored by the entity's rank (its default sort key), so
    that a query can walk it in page order. With `rank_changed`, every trigram kept is
    written again with the new rank.
    """
    packed = member(entity_id)
    ops: list[tuple[str | bytes | int, ...]] = [("ZREM", key_of(g), packed) for g in sorted(before - after)]
    added = after if rank_changed else after - before
    ops.extend(("ZADD", key_of(g), rank, packed) for g in sorted(added))
    return ops


@dataclass(frozen=True, slots=True)
class Candidates:
    """How a term is answered: candidate `ids` (a superset of the matches), a `walk`, or neither: scan."""

    ids: list[str] | None
    # Whether the query's checkpoint has been read (the scan must then not read it again).
    checkpoint_read: bool = False
    # The term's trigram sets, rarest first, to walk in rank order (read_service.views.paging).
    walk: list[str] | None = None
    # Whether the walk is of sets larger than the probe bound: it then reads a bounded number
    # of ids per call, as the scan does, and may give a short page with a next cursor.
    bounded: bool = False


async def candidates(
    client: aioredis.Redis,
    key_of: Callable[[str], str],
    term: str,
    limit: int,
    at: QueryCheckpoint | None,
    *,
    ranked: bool = False,
) -> Candidates:
    """How to answer a case-folded `term`; `at`'s checkpoint is read in the first round trip.

    Returns `ids` None and no walk when the term is shorter than a trigram or has more than
    `limit` candidates (see PROBE_FACTOR): the caller scans the sort index. Whenever a
    trigram set is read, `at`'s checkpoint has been read before it (in the same pipeline), so
    the caller's scan must not read it again. With `ranked` (the query is in rank order) the
    answer is the trigram sets to walk, rarest first (`walk`), so that the caller reads
    Redis only as far as its page reaches; otherwise the intersection itself, by id.
    """
    term_grams = sorted(grams([term]))
    if not term_grams or limit <= 0:
        return Candidates(None)
    keys = [key_of(g) for g in term_grams]

    def queue(pipe: Pipeline) -> None:
        for key in keys:
            pipe.zcard(key)

    sizes = [int(n) for n in await first_read(client, at, queue)]
    rarest = min(sizes)
    if rarest == 0:
        return Candidates([], checkpoint_read=True)
    # Smallest set first: the walk reads it in order and probes the others.
    ordered = [key for _, key in sorted(zip(sizes, keys, strict=True))]
    common = rarest > limit * PROBE_FACTOR
    if ranked:
        # A common term is walked too: its hits are dense, so the walk fills a page after a
        # few dozen ids and reads only the page's views, where the scan reads and parses a
        # view per entity of the whole index until the page is full.
        return Candidates(None, checkpoint_read=True, walk=ordered, bounded=common)
    if common:
        return Candidates(None, checkpoint_read=True)
    members: list[Any] = list(await client.zinter(ordered))
    if len(members) > limit:
        return Candidates(None, checkpoint_read=True)
    return Candidates(sorted(entity_of(m) for m in members), checkpoint_read=True)


@dataclass(frozen=True, slots=True)
class Position:
    """Where a walk stands: a rank (a Redis score bound: a number, `-inf` or `+inf`) and the id after which to go on."""

    score: str
    after_id: str = ""


@dataclass(frozen=True, slots=True)
class Step:
    """What one step of a walk found: (rank, id) in walk order, whether the range is exhausted, where it stopped."""

    found: list[tuple[int, str]]
    done: bool
    position: Position
    # Ids of the rarest set the step read.
    walked: int = 0


class Walker:
    """Walks a term's trigram sets in rank order (search_walk.lua); raises the driver's errors."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._script = client.register_script(_WALK_SCRIPT)

    async def step(
        self, keys: list[str], start: Position, stop: str, wanted: int, *, descending: bool, budget: int | None = None
    ) -> Step:
        """Up to `wanted` ids in every set of `keys` (the rarest first), after `start` and up to rank `stop`.

        At most `budget` ids of the rarest set are read (never more than WALK_BUDGET per call).
        """
        walk = WALK_BUDGET if budget is None else min(budget, WALK_BUDGET)
        after = member(start.after_id) if start.after_id else b""
        args = ["1" if descending else "0", start.score, after, stop, wanted, walk, WALK_CHUNK]
        reply = list(await self._script(keys=keys, args=args))
        done, last_score, last_id, walked, *flat = reply
        found = [(_rank(flat[i + 1]), entity_of(flat[i])) for i in range(0, len(flat), 2)]
        last = entity_of(last_id) if last_id else ""
        return Step(found, int(done) == 1, Position(_text(last_score), last), int(walked))


def rank_of(position: Position) -> int:
    """The rank of a position a walk has reached (not an end of the set)."""
    return _rank(position.score)


def _rank(score: bytes | str) -> int:
    # Ranks are whole microseconds, exact in a double (below 2**53).
    return int(float(_text(score)))


def _text(member: bytes | str) -> str:
    return member.decode() if isinstance(member, bytes) else str(member)
