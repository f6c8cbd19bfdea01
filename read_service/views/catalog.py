"""Queries over the catalog read model (key layout in read_service.keys, CatalogKeys)."""

from __future__ import annotations

from dataclasses import dataclass

from read_service.keys import CatalogKeys, member_id
from read_service.view_store import QueryCheckpoint, read_single_view, read_view_field
from read_service.views.base import ViewsBase
from read_service.views.checkpointed import first_read
from read_service.views.wire import view_bytes, view_field
from tessera.catalog.v1.product_query_service_pb2 import ProductView


@dataclass(frozen=True, slots=True)
class ListProductsQuery:
    """One page request of ListProducts, validated and normalized."""

    page_size: int
    include_discontinued: bool = False
    # Keyset cursor: the index member of the last product the previous page covered.
    cursor: bytes | None = None

    def binding(self) -> bytes:
        """What a page token for this query is bound to: everything but the size and cursor."""
        return f"catalog.list|{int(self.include_discontinued)}".encode()


@dataclass(frozen=True, slots=True)
class ProductPage:
    """One page of products and the cursor to continue after it (None on the last page)."""

    products: list[ProductView]
    next_cursor: bytes | None


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


class ProductViews(ViewsBase[CatalogKeys]):
    """Reads products from Redis; raises the driver's errors for the caller to map."""

    async def get(self, product_id: str) -> ProductView | None:
        """The product with this canonical id, or None (through the near cache, when there is one)."""
        key = self._keys.view(product_id)
        field = await (
            self._read_field(key) if self._cache is None else self._cache.get((key,), lambda: self._read_field(key))
        )
        return None if field is None else ProductView.FromString(view_bytes(field))

    async def get_at(self, product_id: str, at: QueryCheckpoint) -> ProductView | None:
        """Like `get`, also setting `at.position`; a read from Redis takes the checkpoint in the same round trip."""
        return await read_single_view(
            self._client, self._keys.view(product_id), ProductView.FromString, at, self._cache
        )

    async def field_at(self, product_id: str, at: QueryCheckpoint) -> bytes | None:
        """Like `get_at`, as field 1 of a reply (read_service.views.wire), without parsing the view."""
        return await read_view_field(self._reader, self._client, self._keys.view(product_id), at, self._cache)

    async def _read_field(self, key: str) -> bytes | None:
        raw = await self._client.get(key)
        return None if raw is None else view_field(_as_bytes(raw))

    async def _read(self, product_id: str) -> ProductView | None:
        raw = await self._client.get(self._keys.view(product_id))
        return None if raw is None else ProductView.FromString(_as_bytes(raw))

    async def version(self, product_id: str) -> int:
        """The product version the view reflects (0 when there is none)."""
        view = await self._read(product_id.lower())
        return 0 if view is None else view.version

    async def list_page(self, query: ListProductsQuery, at: QueryCheckpoint | None = None) -> ProductPage:
        """One page in sku order (case-insensitive) after the query's cursor; `at`'s checkpoint read with the range."""
        low = b"(" + query.cursor if query.cursor is not None else b"-"
        index = self._keys.index(query.include_discontinued)
        (reply,) = await first_read(
            self._client, at, lambda pipe: pipe.zrange(index, low, b"+", bylex=True, offset=0, num=query.page_size + 1)
        )
        members = [m for m in reply if isinstance(m, bytes)]
        page = members[: query.page_size]
        raws = await self._client.mget([self._keys.view(member_id(m)) for m in page]) if page else []
        products = [ProductView.FromString(_as_bytes(raw)) for raw in raws if raw is not None]
        if not query.include_discontinued:
            # A product discontinued between the index read and the view read leaves the page.
            products = [p for p in products if not p.discontinued]
        next_cursor = page[-1] if len(members) > query.page_size else None
        return ProductPage(products, next_cursor)
