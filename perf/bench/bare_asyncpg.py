"""The AddProduct transaction with a keyed request, as plain asyncpg statements: the write bench's ceiling.

The statements and their order follow what the write service runs for one AddProduct sent
with an idempotency key (unit of work, idempotency store, product repository, outbox append,
command log), with the same parameters, so the only difference from the service is everything
around the SQL: gRPC, validation, the handler and its domain objects.

    BEGIN; SET LOCAL statement_timeout = ...             -- one round trip
    SELECT pg_try_advisory_xact_lock(lock_id)          -- the key's lock
    SELECT ... FROM idempotency_keys WHERE ...         -- no stored reply
    SELECT EXISTS (... products WHERE lower(sku) = ...)
    INSERT INTO products ...
    INSERT INTO outbox_event ...                              -- ProductAdded (executemany, as the service)
    INSERT INTO command_log ...
    INSERT INTO idempotency_keys ... ON CONFLICT ...    -- the stored reply
    COMMIT
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from tessera.catalog.v1 import catalog_command_service_pb2 as catalog
from tessera.catalog.v1 import events_pb2
from tessera.common.v1 import money_pb2

PRINCIPAL = "anonymous"  # the principal of every call to a service running without auth
COMMAND_TYPE = "AddProduct"
AGGREGATE_TYPE = "product"
RETENTION = timedelta(hours=24)

_BEGIN = "BEGIN; SET LOCAL statement_timeout = {timeout_ms}"
_LOCK = "SELECT pg_try_advisory_xact_lock($1)"
_STORED_REPLY = """
SELECT fingerprint, command_id, aggregate_id, aggregate_version, reply, created_at, expires_at
FROM idempotency_keys
WHERE principal = $1 AND command_type = $2 AND idempotency_key = $3
"""
_SKU_TAKEN = "SELECT EXISTS (SELECT 1 FROM products WHERE lower(sku) = lower($1))"
_INSERT_PRODUCT = """
INSERT INTO products (id, sku, name, currency_code, price_minor, stock_available, discontinued, discontinued_reason,
                      version, created_at, updated_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
"""
_INSERT_OUTBOX = """
INSERT INTO outbox_event (event_id, event_type, schema_version, aggregate_type, aggregate_id,
                    aggregate_version, payload, occurred_at, correlation_id, causation_id,
                    traceparent, tracestate)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
"""
_INSERT_COMMAND_LOG = """
INSERT INTO command_log (command_id, command_type, aggregate_type, aggregate_id, correlation_id,
                         received_at, completed_at, outcome, status_code, error_message,
                         event_ids, summary, principal, idempotency_key, replay_of)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12::jsonb, $13, $14, $15)
"""
_UPSERT_STORED_REPLY = """
INSERT INTO idempotency_keys (principal, command_type, idempotency_key, lock_id, fingerprint, command_id,
                              aggregate_id, aggregate_version, reply, created_at, expires_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT (principal, command_type, idempotency_key) DO UPDATE
SET lock_id = EXCLUDED.lock_id, fingerprint = EXCLUDED.fingerprint, command_id = EXCLUDED.command_id,
    aggregate_id = EXCLUDED.aggregate_id, aggregate_version = EXCLUDED.aggregate_version,
    reply = EXCLUDED.reply, created_at = EXCLUDED.created_at, expires_at = EXCLUDED.expires_at
WHERE idempotency_keys.expires_at <= EXCLUDED.created_at
"""


def lock_id(principal: str, command_type: str, key: str) -> int:
    """The signed 64-bit advisory-lock key of an idempotency scope (as the write service derives it)."""
    encoded = json.dumps([principal, command_type, key]).encode()
    return int.from_bytes(hashlib.sha256(encoded).digest()[:8], "big", signed=True)


async def add_product(conn: asyncpg.Connection[Any] | Any, sku: str, key: str, *, timeout_ms: int = 10_000) -> None:
    """Run one keyed AddProduct transaction for `sku` on `conn`."""
    await conn.execute(_BEGIN.format(timeout_ms=int(timeout_ms)))
    try:
        await _statements(conn, sku, key)
        committed = await conn.execute("COMMIT") == "COMMIT"
    except BaseException:
        if conn.is_in_transaction():
            await conn.execute("ROLLBACK")
        raise
    if not committed:
        raise RuntimeError("the transaction was rolled back instead of committed")


async def _statements(conn: asyncpg.Connection[Any] | Any, sku: str, key: str) -> None:
    """The transaction's statements, between BEGIN and COMMIT."""
    product_id = uuid.uuid4()
    command_id = uuid.uuid4()
    event_id = uuid.uuid4()
    now = datetime.now(UTC)
    name = f"Bench product {sku}"
    summary = {"sku": sku, "currency_code": "EUR", "price_minor": 1999, "initial_stock": 100}
    fingerprint = hashlib.sha256(json.dumps({"command_type": COMMAND_TYPE, "fields": summary}).encode()).digest()
    event = events_pb2.ProductAdded(
        product_id=str(product_id),
        sku=sku,
        name=name,
        price=money_pb2.Money(currency_code="EUR", amount_minor=1999),
        stock_available=100,
    )
    event.added_at.FromDatetime(now)
    scope_lock = lock_id(PRINCIPAL, COMMAND_TYPE, key)
    if not await conn.fetchval(_LOCK, scope_lock):
        raise RuntimeError(f"idempotency key {key} is locked")
    if await conn.fetchrow(_STORED_REPLY, PRINCIPAL, COMMAND_TYPE, key) is not None:
        raise RuntimeError(f"idempotency key {key} already has a reply")
    if await conn.fetchval(_SKU_TAKEN, sku):
        raise RuntimeError(f"sku {sku} is taken")
    await conn.execute(_INSERT_PRODUCT, product_id, sku, name, "EUR", 1999, 100, False, "", 1, now, now)
    await conn.executemany(
        _INSERT_OUTBOX,
        [
            (
                event_id,
                event.DESCRIPTOR.full_name,
                1,
                AGGREGATE_TYPE,
                str(product_id),
                1,
                event.SerializeToString(),
                now,
                str(command_id),
                str(command_id),
                "",
                "",
            )
        ],
    )
    completed = datetime.now(UTC)
    await conn.execute(
        _INSERT_COMMAND_LOG,
        command_id,
        COMMAND_TYPE,
        AGGREGATE_TYPE,
        str(product_id),
        str(command_id),
        now,
        completed,
        "succeeded",
        "OK",
        "",
        [event_id],
        json.dumps(summary, sort_keys=True),
        PRINCIPAL,
        key,
        None,
    )
    reply = catalog.AddProductResponse(product_id=str(product_id), version=1).SerializeToString()
    status = await conn.execute(
        _UPSERT_STORED_REPLY,
        PRINCIPAL,
        COMMAND_TYPE,
        key,
        scope_lock,
        fingerprint,
        command_id,
        str(product_id),
        1,
        reply,
        completed,
        completed + RETENTION,
    )
    if status != "INSERT 0 1":
        raise RuntimeError(f"idempotency key {key} was stored concurrently")
