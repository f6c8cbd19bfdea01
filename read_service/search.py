"""The trigram search index: which entities a search term may match, without reading every view.

A projection keeps one Redis set per trigram (three consecutive characters of a case-folded
searchable field) in its own key space, holding the ids of the entities whose fields contain
that trigram (read_service.keys: `users:tri:<gram>`, `orders:tri:<gram>`). The sets are written
by the projection's ops, in the same apply script call as the views, so they follow the views
through checkpoints, generations (rebuilds), upcasting and parking without code of their own.

A query for a term of at least three characters reads the cardinality of each of its trigram
sets. When the smallest is at most a few times `limit` and the intersection of the sets holds
at most `limit` ids (a rare term), the intersection is a short candidate list that holds every
entity whose fields contain the term (a substring's trigrams are all trigrams of the field
that contains it); the caller then reads those views, keeps those that really contain the
term, orders them by the requested sort and pages them (read_service.views.paging). Each
projection also keeps a rank set (`users:rank`, `orders:rank`: every id scored by its
default sort key), so that for a query in that order the intersection comes back ranked and
only the first page's views need reading. A shorter term, or a common one (more
candidates), is answered by the ordered scan of the sort index instead, which fills pages fast
precisely because the term is common. See docs/decisions/0037-search-index.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
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
# many times larger, is still intersected: its trigrams may each be common while together
# they are rare (a prefix such as "emma.wilson1"). Only a larger intersection is scanned.
# SINTER stops probing an id at the first set that lacks it, so the probe costs about one
# lookup per id of the rarest set; what bounds the factor is the reply when the term is common.
PROBE_FACTOR = 10


def grams(texts: Iterable[str]) -> set[str]:
    """The trigrams of each case-folded text (none spans two texts)."""
    found: set[str] = set()
    for text in texts:
        folded = text.casefold()
        found.update(folded[i : i + GRAM] for i in range(len(folded) - GRAM + 1))
    return found


def gram_ops(
    key_of: Callable[[str], str], entity_id: str, before: set[str], after: set[str]
) -> list[tuple[str, str, str]]:
    """The set writes that move an entity from the trigrams `before` to `after` (in a stable order)."""
    ops = [("SREM", key_of(g), entity_id) for g in sorted(before - after)]
    ops.extend(("SADD", key_of(g), entity_id) for g in sorted(after - before))
    return ops


@dataclass(frozen=True, slots=True)
class Candidates:
    """The ids that may match a term (a superset of the matches), or `ids` None: scan instead."""

    ids: list[str] | None
    # Whether the query's checkpoint has been read (the scan must then not read it again).
    checkpoint_read: bool = False
    # Whether `ids` are in rank order (by sort key, then id: the order of the sort index).
    ranked: bool = False


async def candidates(
    client: aioredis.Redis,
    key_of: Callable[[str], str],
    term: str,
    limit: int,
    at: QueryCheckpoint | None,
    *,
    rank_key: str | None = None,
) -> Candidates:
    """The candidate ids of a case-folded `term`; `at`'s checkpoint is read in the first round trip.

    Returns `ids` None when the term is shorter than a trigram or has more than `limit`
    candidates (see PROBE_FACTOR): the caller scans the sort index. Whenever a trigram
    set is read, `at`'s checkpoint has been read before it (in the same pipeline), so the
    caller's scan must not read it again. With `rank_key` (a sorted set of every entity's
    rank) the ids come in rank order (`ranked`), so that a caller can read the views of a
    first page only: by ZINTER when the rarest set is within the limit, else by SINTER and
    then the ranks of the ids (ZMSCORE) once the intersection is known to be within it.
    """
    term_grams = sorted(grams([term]))
    if not term_grams or limit <= 0:
        return Candidates(None)
    keys = [key_of(g) for g in term_grams]

    def queue(pipe: Pipeline) -> None:
        for key in keys:
            pipe.scard(key)

    sizes = [int(n) for n in await first_read(client, at, queue)]
    rarest = min(sizes)
    if rarest > limit * PROBE_FACTOR:
        return Candidates(None, checkpoint_read=True)
    if rarest == 0:
        return Candidates([], checkpoint_read=True, ranked=rank_key is not None)
    # Smallest set first: SINTER walks the first set and probes the others (ZINTER orders them itself).
    ordered = [key for _, key in sorted(zip(sizes, keys, strict=True))]
    return await _intersect(client, ordered, rarest <= limit, limit, rank_key)


async def _intersect(
    client: aioredis.Redis, ordered: list[str], surely_small: bool, limit: int, rank_key: str | None
) -> Candidates:
    """The ids in every set of `ordered` (None past `limit`), in rank order when `rank_key` is given."""
    if rank_key is not None and surely_small:
        # The intersection cannot exceed the limit: take it ranked in one call.
        return await _ranked_intersection(client, ordered, rank_key)
    members = await client.sinter(ordered)
    if len(members) > limit:
        return Candidates(None, checkpoint_read=True)
    ids = [_text(m) for m in members]
    if rank_key is None:
        return Candidates(sorted(ids), checkpoint_read=True)
    # Ranked only once it is known to be small: a large intersection is thrown away unranked.
    scores = await client.zmscore(rank_key, ids) if ids else []
    ranked = sorted((int(score), entity_id) for entity_id, score in zip(ids, scores, strict=True) if score is not None)
    return Candidates([entity_id for _, entity_id in ranked], checkpoint_read=True, ranked=True)


async def _ranked_intersection(client: aioredis.Redis, keys: list[str], rank_key: str) -> Candidates:
    """The ids in every one of `keys`, in rank order (ZINTER answers by score, ties by member)."""
    # The sets count 0 towards the score: each member's score is its rank.
    reply: list[Any] = list(await client.zinter({rank_key: 1, **dict.fromkeys(keys, 0)}))
    return Candidates([_text(member) for member in reply], checkpoint_read=True, ranked=True)


def _text(member: bytes | str) -> str:
    return member.decode() if isinstance(member, bytes) else str(member)
