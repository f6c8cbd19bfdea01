"""Products in Postgres: the `products` table, and the sku look-ups orders and the saga share.

Skus are matched with lower(sku), which the unique index products_sku_lower_key answers.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import asyncpg

from shared_kernel import errors
from write_service.adapters.pg_calls import Calls
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

_SELECT_FOR_UPDATE = f"SELECT {PRODUCT_COLUMNS} FROM products WHERE id = $1 FOR UPDATE"  # noqa: S608 - constant

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
    """Products in the `products` table, read and written on the unit of work's connection."""

    def __init__(self, calls: Calls) -> None:
        self._calls = calls

    async def sku_taken(self, sku: str) -> bool:
        """Whether a product already has `sku`, case-insensitively."""
        return bool(await self._calls.run(self._calls.conn.fetchval(_SKU_TAKEN, sku)))

    async def get_for_update(self, product_id: uuid.UUID) -> catalog.Product | None:
        """The product row, locked FOR UPDATE until the transaction ends."""
        row = await self._calls.run(self._calls.conn.fetchrow(_SELECT_FOR_UPDATE, product_id))
        return product_from_row(row) if row is not None else None

    async def by_skus(self, skus: Sequence[str]) -> dict[str, catalog.Product]:
        """The products with these skus, share-locked until the transaction ends."""
        return await self._calls.run(products_by_skus(self._calls.conn, skus, lock="share"))

    async def add(self, product: catalog.Product) -> None:
        """Insert a new product; the unique index on lower(sku) (a concurrent twin) becomes AlreadyExists."""
        try:
            await self._calls.run(self._calls.conn.execute(_INSERT, *_row(product)))
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name == SKU_INDEX:
                raise catalog.sku_taken() from exc
            raise
        product.stored_version = product.version

    async def save(self, product: catalog.Product) -> None:
        """Update the row if it is still at the version loaded; otherwise raise Conflict."""
        changed = (product.name, product.price_minor, product.stock_available, product.discontinued)
        status = await self._calls.run(
            self._calls.conn.execute(
                _UPDATE,
                product.id,
                *changed,
                product.discontinued_reason,
                product.version,
                product.updated_at,
                product.stored_version,
            )
        )
        if status != "UPDATE 1":
            # FOR UPDATE makes this unreachable in practice; it guards against a caller that skipped it.
            raise errors.Conflict(f"product {product.id} changed concurrently, retry the request")
        product.stored_version = product.version
