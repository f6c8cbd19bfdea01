"""Products in Postgres: the `products` table, and the sku look-ups orders and the saga share.

Skus are matched with lower(sku), which the unique index products_sku_lower_key answers.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import asyncpg

from write_service.adapters.pg_calls import Calls, Step
from write_service.domain import catalog
from write_service.service_layer.ports import ProductRepository

if TYPE_CHECKING:
    from write_service.adapters.pg_calls import Connection

PRODUCT_COLUMNS = (
    "id, sku, name, currency_code, price_minor, stock_available, discontinued, discontinued_reason, "
    "version, created_at, updated_at"
)

# The unique index (migration 0004) that makes a sku unique case-insensitively.
SKU_INDEX = "products_sku_lower_key"

RowLock = Literal["share", "update"] | None

_SKU_TAKEN = "SELECT EXISTS (SELECT 1 FROM products WHERE lower(sku) = lower($1))"

_SELECT = f"SELECT {PRODUCT_COLUMNS} FROM products WHERE id = $1"  # noqa: S608 - constant
_SELECT_LOCKED = _SELECT + " FOR UPDATE"  # a retry after a lost guard (`Calls.lock_reads`)
_SELECT_MANY = f"SELECT {PRODUCT_COLUMNS} FROM products WHERE id = ANY($1::uuid[]) ORDER BY id"  # noqa: S608 - constant
_SELECT_MANY_LOCKED = _SELECT_MANY + " FOR UPDATE"

_INSERT = f"""
INSERT INTO products ({PRODUCT_COLUMNS})
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
"""  # noqa: S608 - constant columns

# The sku and the currency never change; the version loaded guards against a lost update.
_UPDATE = """
UPDATE products
SET name = $2, price_minor = $3, stock_available = $4, discontinued = $5, discontinued_reason = $6,
    version = $7, updated_at = $8
WHERE id = $1 AND version = $9
RETURNING 1
"""

# A step of an order's write: the products it priced are still sold at the price, name and
# currency read, and FOR SHARE keeps them so until the order's statement commits. Stock is
# not compared: a restock or a reservation meanwhile changes nothing the order copied.
# Rows are locked in id order, as every other multi-product lock is.
_STILL_AS_READ = """
SELECT 1
FROM products AS p
JOIN unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[]) AS r (id, name, price_minor, currency_code)
  ON p.id = r.id AND p.name = r.name AND p.price_minor = r.price_minor AND p.currency_code = r.currency_code
WHERE NOT p.discontinued
ORDER BY p.id
FOR SHARE OF p
"""

# Rows are locked in id order, so two transactions locking overlapping sets cannot deadlock
# each other (the saga's reserve step locks in the same order).
_BY_SKUS = {
    None: f"SELECT {PRODUCT_COLUMNS} FROM products WHERE lower(sku) = ANY($1::text[]) ORDER BY id",  # noqa: S608
    "share": f"SELECT {PRODUCT_COLUMNS} FROM products WHERE lower(sku) = ANY($1::text[]) ORDER BY id FOR SHARE",  # noqa: S608
    "update": f"SELECT {PRODUCT_COLUMNS} FROM products WHERE lower(sku) = ANY($1::text[]) ORDER BY id FOR UPDATE",  # noqa: S608
}


def _row(product: catalog.Product) -> tuple[object, ...]:
    """The product's values in PRODUCT_COLUMNS order."""
    return (
        product.id,
        product.sku,
        product.name,
        product.currency_code,
        product.price_minor,
        product.stock_available,
        product.discontinued,
        product.discontinued_reason,
        product.version,
        product.created_at,
        product.updated_at,
    )


def product_from_row(row: asyncpg.Record) -> catalog.Product:
    """A Product aggregate from a `products` row selected with PRODUCT_COLUMNS."""
    return catalog.Product(
        id=row["id"],
        sku=row["sku"],
        name=row["name"],
        currency_code=row["currency_code"],
        price_minor=row["price_minor"],
        stock_available=row["stock_available"],
        discontinued=row["discontinued"],
        discontinued_reason=row["discontinued_reason"],
        version=row["version"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        stored_version=row["version"],
    )


async def products_by_skus(
    conn: Connection | asyncpg.Connection[Any], skus: Sequence[str], *, lock: RowLock = "share"
) -> dict[str, catalog.Product]:
    """The products with these skus (case-insensitively), keyed by lower-case sku, locked as asked, in id order."""
    rows = await conn.fetch(_BY_SKUS[lock], sorted({sku.lower() for sku in skus}))
    return {row["sku"].lower(): product_from_row(row) for row in rows}


class PostgresProductRepository(ProductRepository):
    """Products in the `products` table, read and written through the unit of work's calls."""

    def __init__(self, calls: Calls) -> None:
        self._calls = calls

    async def sku_taken(self, sku: str) -> bool:
        """Whether a product already has `sku`, case-insensitively."""
        return bool(await self._calls.fetchval(_SKU_TAKEN, sku))

    async def get(self, product_id: uuid.UUID) -> catalog.Product | None:
        """The product as stored now; its save is guarded by the version read here."""
        row = await self._calls.fetchrow(_SELECT_LOCKED if self._calls.lock_reads else _SELECT, product_id)
        if row is None:
            return None
        self._calls.loaded.add(("product", product_id))
        return product_from_row(row)

    async def by_ids(self, product_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, catalog.Product]:
        """The products with these ids, in one read; each save is guarded by the version read here."""
        query = _SELECT_MANY_LOCKED if self._calls.lock_reads else _SELECT_MANY
        found = {row["id"]: product_from_row(row) for row in await self._calls.fetch(query, sorted(set(product_ids)))}
        self._calls.loaded.update(("product", product_id) for product_id in found)
        return found

    async def by_skus(self, skus: Sequence[str]) -> dict[str, catalog.Product]:
        """The products with these skus; the write fails (Conflict) if those still sold change before it commits."""
        found = {
            row["sku"].lower(): product_from_row(row)
            for row in await self._calls.fetch(
                _BY_SKUS["share" if self._calls.lock_reads else None], sorted({sku.lower() for sku in skus})
            )
        }
        sold = [product for product in found.values() if not product.discontinued]
        if sold:
            self._calls.write(
                Step(
                    _STILL_AS_READ,
                    (
                        [p.id for p in sold],
                        [p.name for p in sold],
                        [p.price_minor for p in sold],
                        [p.currency_code for p in sold],
                    ),
                    expect_rows=len(sold),
                    conflict="a product of the order changed concurrently, retry the request",
                    writes=False,
                )
            )
        return found

    async def add(self, product: catalog.Product) -> None:
        """Insert a new product at commit; the unique index on lower(sku) (a concurrent twin) becomes AlreadyExists."""
        self._calls.write(Step(_INSERT, _row(product), unique={SKU_INDEX: catalog.sku_taken}))
        await self._calls.check_insert_now()
        product.stored_version = product.version

    def adopt(self, product: catalog.Product) -> None:
        """Its save is guarded by its stored version, as if it had been read here."""
        self._calls.loaded.add(("product", product.id))

    async def save(self, product: catalog.Product) -> None:
        """Update the row at commit if it is still at the version loaded; otherwise the commit raises Conflict."""
        changed = (product.name, product.price_minor, product.stock_available, product.discontinued)
        self._calls.write(
            Step(
                _UPDATE,
                (
                    product.id,
                    *changed,
                    product.discontinued_reason,
                    product.version,
                    product.updated_at,
                    product.stored_version,
                ),
                expect_rows=1,
                conflict=f"product {product.id} changed concurrently, retry the request",
            )
        )
        await self._calls.check_version_now("product", product.id)
        product.stored_version = product.version
