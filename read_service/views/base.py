"""What every view reader shares: its Redis client, key layout, near cache and, for lists that search, a pager."""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

import redis.asyncio as aioredis

from read_service.near_cache import NearCache
from read_service.search import DEFAULT_CANDIDATE_LIMIT
from read_service.view_store import QueryCheckpoint, ViewReader
from read_service.views.paging import IndexPager


class HasViews(Protocol):
    """A key layout that names one view key per entity."""

    def view(self, entity_id: str, /) -> str: ...


K = TypeVar("K", bound=HasViews)


class ViewsBase(Generic[K]):
    """Reads one read model's views from Redis, through the near cache when there is one."""

    def __init__(self, client: aioredis.Redis, keys: K, *, cache: NearCache | None = None) -> None:
        self._client = client
        self._reader = ViewReader(client)
        self._keys = keys
        self._cache = cache

    def cached_field(self, entity_id: str, at: QueryCheckpoint) -> tuple[bytes | None] | None:
        """`(field,)` from the near cache at the projector's checkpoint, setting `at.position`; None on a miss."""
        if self._cache is None:
            return None
        hit: tuple[bytes | None] | None = at.from_memory(self._cache, self._keys.view(entity_id))
        return hit


class SearchableViews(ViewsBase[K]):
    """A read model whose lists page through sort indexes and search its trigram index (read_service.views.paging)."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: K,
        scan_limit: int = 5000,
        *,
        cache: NearCache | None = None,
        candidate_limit: int = DEFAULT_CANDIDATE_LIMIT,
    ) -> None:
        super().__init__(client, keys, cache=cache)
        # A filtered scan reads at most `scan_limit` members per call; a search with more than
        # `candidate_limit` candidates scans instead of reading them (read_service.search).
        self._pager = IndexPager(client, scan_limit, candidate_limit)
