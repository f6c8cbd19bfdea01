"""Orders and their sagas in Postgres: orders, their lines and stock reservations, saga rows and step log."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import asyncpg

from write_service.adapters.pg_calls import Calls, Step
from write_service.domain import orders
from write_service.service_layer.ports import OrderRepository, SagaHandoff

ORDER_COLUMNS = (
    "id, customer_id, status, currency_code, total_minor, shipping_address, notes, reason, cancelled_by, "
    "carrier, tracking_number, version, placed_at, updated_at"
)

# The order and its lines in one round trip: the lines as a JSON array, in line order.
_SELECT = f"""
SELECT {ORDER_COLUMNS},
       (SELECT coalesce(json_agg(json_build_object(
                   'line_no', l.line_no, 'product_id', l.product_id, 'sku', l.sku, 'product_name', l.product_name,
                   'unit_price_minor', l.unit_price_minor, 'quantity', l.quantity) ORDER BY l.line_no), '[]')::text
        FROM order_lines AS l WHERE l.order_id = o.id) AS lines,
       (SELECT coalesce(json_object_agg(r.product_id, r.quantity), '{{}}')::text
        FROM stock_reservations AS r WHERE r.order_id = o.id AND r.released_at IS NULL) AS reservations
FROM orders AS o WHERE o.id = $1
"""  # noqa: S608 - constant columns
# Locked reads (a retry after a lost guard, `Calls.lock_reads`, or a saga step) lock the
# order rows first and read them in a second statement: a statement that waited for a row
# lock sees the row's new version but its sub-selects (the lines, the reservations) still
# see the snapshot taken before the wait, so one statement could return a line list older
# than the row it locked.
_LOCK = "SELECT 1 FROM orders WHERE id = $1 FOR UPDATE"
# The same columns for a customer's orders in some statuses (orders_customer_idx answers it).
_SELECT_OF_CUSTOMER = _SELECT.replace("WHERE o.id = $1", "WHERE o.customer_id = $1 AND o.status = ANY($2::text[])")
_LOCK_OF_CUSTOMER = "SELECT 1 FROM orders WHERE customer_id = $1 AND status = ANY($2::text[]) ORDER BY id FOR UPDATE"

_INSERT = f"""
INSERT INTO orders ({ORDER_COLUMNS})
VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10, $11, $12, $13, $14)
"""  # noqa: S608 - constant columns

# Guarded by the status read as well as the version: the saga moves an order from pending
# to reserved without an event, so without bumping its version.
_UPDATE = """
UPDATE orders
SET status = $2, total_minor = $3, reason = $4, cancelled_by = $5, carrier = $6, tracking_number = $7,
    version = $8, updated_at = $9
WHERE id = $1 AND version = $10 AND status = $11
RETURNING 1
"""

# A line's price, product and name never change; only a new line or a larger quantity is written.
_UPSERT_LINES = """
INSERT INTO order_lines (order_id, line_no, product_id, sku, product_name, unit_price_minor, quantity)
SELECT $1, l.line_no, l.product_id, l.sku, l.product_name, l.unit_price_minor, l.quantity
FROM unnest($2::int[], $3::uuid[], $4::text[], $5::text[], $6::bigint[], $7::bigint[])
     AS l (line_no, product_id, sku, product_name, unit_price_minor, quantity)
ON CONFLICT (order_id, line_no) DO UPDATE SET quantity = EXCLUDED.quantity
WHERE order_lines.quantity IS DISTINCT FROM EXCLUDED.quantity
"""

_RESERVE = """
INSERT INTO stock_reservations (order_id, product_id, quantity, reserved_at)
SELECT $1, r.product_id, r.quantity, $4 FROM unnest($2::uuid[], $3::bigint[]) AS r (product_id, quantity)
"""
# Guarded: releasing what another transaction released first fails the write (Conflict).
_RELEASE = """
UPDATE stock_reservations SET released_at = $3
WHERE order_id = $1 AND product_id = ANY($2::uuid[]) AND released_at IS NULL
RETURNING 1
"""

# Moves the execution row on, guarded by the version the worker holds; keeps or drops the
# lease in the same statement. next_attempt_at and locked_until use the database clock,
# the clock the claim query compares with.
_ADVANCE_SAGA = """
UPDATE saga_executions
SET status = $3, current_step = $4, context = $5::jsonb, attempts = $6, last_error = $7,
    next_attempt_at = CASE WHEN $8::float8 IS NULL THEN NULL ELSE now() + make_interval(secs => $8::float8) END,
    locked_by = CASE WHEN $9::float8 IS NOT NULL THEN locked_by END,
    locked_until = CASE WHEN $9::float8 IS NOT NULL THEN now() + make_interval(secs => $9::float8) END,
    version = version + 1, updated_at = now()
WHERE id = $1 AND version = $2
RETURNING 1
"""
# A step that leaves the saga in its status and with this worker: only the step, the context
# and the lease move. Status and due time are left as they are (the claim found it due, so it
# is due again should the lease run out), so no index entry changes (a HOT update) and the
# saga_due trigger, which fires on writes of those columns, wakes no worker for it.
_KEEP_SAGA = """
UPDATE saga_executions
SET current_step = $3, context = $4::jsonb, attempts = 0, last_error = '',
    locked_until = now() + make_interval(secs => $5::float8), version = version + 1, updated_at = now()
WHERE id = $1 AND version = $2
RETURNING 1
"""
_LOG_SAGA_STEP = """
INSERT INTO saga_steps (saga_id, step, kind, outcome, detail, attempt, at) VALUES ($1, $2, $3, $4, $5, $6, now())
"""

# The saga starts due now at its first step; the saga worker (write_service.saga) takes it on.
_START_SAGA = """
INSERT INTO saga_executions (id, saga_type, order_id, status, current_step, context, version, attempts,
                             next_attempt_at, created_at, updated_at)
VALUES ($1, 'place_order', $2, 'running', 'reserve_stock', '{}'::jsonb, 1, 0, $3, $3, $3)
"""

# Whatever state the saga is in (completed and failed included), it now has to undo what it did.
# The order's row is locked before the saga's (the EXISTS runs first), as every saga step
# locks them: a saga step running meanwhile and this statement cannot deadlock.
_COMPENSATE_SAGA = """
UPDATE saga_executions
SET status = 'compensating', current_step = 'compensate', attempts = 0, last_error = '',
    next_attempt_at = $2, version = version + 1, updated_at = $2
WHERE order_id = $1 AND EXISTS (SELECT 1 FROM orders WHERE id = $1 FOR UPDATE)
RETURNING id
"""

# Reads the saga id from the step above (its CTE name goes in {saga}).
_LOG_CANCEL_REQUESTED = """
INSERT INTO saga_steps (saga_id, step, kind, outcome, detail, attempt, at)
SELECT id, 'cancel_requested', 'compensate', 'succeeded', $1, 1, $2 FROM {saga}
RETURNING 1
"""


def _address_json(address: orders.Address) -> str:
    return json.dumps(dataclasses.asdict(address), sort_keys=True)


def _address(text: str) -> orders.Address:
    fields: dict[str, Any] = json.loads(text)
    return orders.Address(**fields)


def _quantities(order: orders.Order) -> dict[int, int]:
    return {line.line_no: line.quantity for line in order.lines}


class PostgresOrderRepository(OrderRepository):
    """Orders and their lines, read and written through the unit of work's calls."""

    def __init__(self, calls: Calls) -> None:
        self._calls = calls
        # The status of each order as read (or adopted) here, which its save is guarded by.
        self._status_read: dict[uuid.UUID, str] = {}
        # The open reservations of each order as read (or adopted) here: its save writes the difference.
        self._reservations_read: dict[uuid.UUID, dict[uuid.UUID, int]] = {}
        # The quantity of each line as read (or adopted) here: its save writes only new or changed lines.
        self._lines_read: dict[uuid.UUID, dict[int, int]] = {}

    async def get(self, order_id: uuid.UUID) -> orders.Order | None:
        """The order with its lines as stored now; its save is guarded by the version read here."""
        if self._calls.lock_reads:
            await self._calls.fetch(_LOCK, order_id)
        row = await self._calls.fetchrow(_SELECT, order_id)
        return self._order(row) if row is not None else None

    async def awaiting_payment_of(self, customer_id: uuid.UUID) -> list[orders.Order]:
        """The customer's pending and reserved orders, in one read; each save is guarded by the version read."""
        statuses = list(orders.AWAITING_PAYMENT)
        if self._calls.lock_reads:
            await self._calls.fetch(_LOCK_OF_CUSTOMER, customer_id, statuses)
        rows = await self._calls.fetch(_SELECT_OF_CUSTOMER, customer_id, statuses)
        return sorted((self._order(row) for row in rows), key=lambda order: order.id)

    def _order(self, row: asyncpg.Record) -> orders.Order:
        order_id: uuid.UUID = row["id"]
        self._calls.loaded.add(("order", order_id))
        self._status_read[order_id] = row["status"]
        lines: list[dict[str, Any]] = json.loads(row["lines"])
        reservations = {uuid.UUID(pid): int(units) for pid, units in json.loads(row["reservations"]).items()}
        self._reservations_read[order_id] = dict(reservations)
        self._lines_read[order_id] = {line["line_no"]: line["quantity"] for line in lines}
        return orders.Order(
            id=row["id"],
            customer_id=row["customer_id"],
            status=row["status"],
            currency_code=row["currency_code"],
            lines=[
                orders.OrderLine(
                    line_no=line["line_no"],
                    product_id=uuid.UUID(line["product_id"]),
                    sku=line["sku"],
                    product_name=line["product_name"],
                    unit_price_minor=line["unit_price_minor"],
                    quantity=line["quantity"],
                )
                for line in lines
            ],
            shipping_address=_address(row["shipping_address"]),
            notes=row["notes"],
            reason=row["reason"],
            cancelled_by=row["cancelled_by"],
            carrier=row["carrier"],
            tracking_number=row["tracking_number"],
            version=row["version"],
            placed_at=row["placed_at"],
            updated_at=row["updated_at"],
            stored_version=row["version"],
            reservations=reservations,
        )

    async def add(self, order: orders.Order) -> None:
        """Insert the order and its lines at commit."""
        self._calls.write(
            Step(
                _INSERT,
                (
                    order.id,
                    order.customer_id,
                    order.status,
                    order.currency_code,
                    order.total_minor,
                    _address_json(order.shipping_address),
                    order.notes,
                    order.reason,
                    order.cancelled_by,
                    order.carrier,
                    order.tracking_number,
                    order.version,
                    order.placed_at,
                    order.updated_at,
                ),
            )
        )
        await self._calls.check_insert_now()
        self._write_lines(order)
        self._lines_read[order.id] = _quantities(order)
        order.stored_version = order.version

    def adopt(self, order: orders.Order) -> None:
        """Its save is guarded by its stored version and status, as if it had been read here."""
        self._calls.loaded.add(("order", order.id))
        self._status_read[order.id] = order.status
        self._reservations_read[order.id] = dict(order.reservations)
        self._lines_read[order.id] = _quantities(order)

    async def save(self, order: orders.Order) -> None:
        """Update the order at commit if it is still at the version loaded (else Conflict), and its lines."""
        self._calls.write(
            Step(
                _UPDATE,
                (
                    order.id,
                    order.status,
                    order.total_minor,
                    order.reason,
                    order.cancelled_by,
                    order.carrier,
                    order.tracking_number,
                    order.version,
                    order.updated_at,
                    order.stored_version,
                    self._status_read.get(order.id, order.status),
                ),
                expect_rows=1,
                conflict=f"order {order.id} changed concurrently, retry the request",
            )
        )
        self._write_lines(order)
        self._write_reservations(order)
        await self._calls.check_version_now("order", order.id)
        order.stored_version = order.version
        self._status_read[order.id] = order.status
        self._reservations_read[order.id] = dict(order.reservations)
        self._lines_read[order.id] = _quantities(order)

    def _write_reservations(self, order: orders.Order) -> None:
        before = self._reservations_read.get(order.id, {})
        taken = {pid: units for pid, units in order.reservations.items() if pid not in before}
        returned = sorted(pid for pid in before if pid not in order.reservations)
        if taken:
            self._calls.write(Step(_RESERVE, (order.id, list(taken), list(taken.values()), order.updated_at)))
        if returned:
            self._calls.write(
                Step(
                    _RELEASE,
                    (order.id, returned, order.updated_at),
                    expect_rows=len(returned),
                    conflict=f"the stock of order {order.id} was released concurrently",
                )
            )

    def _write_lines(self, order: orders.Order) -> None:
        # Lines as read are not written again: an upsert that changes nothing still locks each row.
        read = self._lines_read.get(order.id, {})
        lines = [line for line in order.lines if read.get(line.line_no) != line.quantity]
        if not lines:
            return
        self._calls.write(
            Step(
                _UPSERT_LINES,
                (
                    order.id,
                    [line.line_no for line in lines],
                    [line.product_id for line in lines],
                    [line.sku for line in lines],
                    [line.product_name for line in lines],
                    [line.unit_price_minor for line in lines],
                    [line.quantity for line in lines],
                ),
            )
        )


class PostgresSagaHandoff(SagaHandoff):
    """Starts sagas, asks them to compensate and records their steps, as steps of the unit of work's write."""

    def __init__(self, calls: Calls) -> None:
        self._calls = calls

    async def start(self, saga_id: uuid.UUID, order_id: uuid.UUID, now: datetime) -> None:
        """Insert the running place_order saga, due now at reserve_stock."""
        self._calls.write(Step(_START_SAGA, (saga_id, order_id, now)))

    async def request_compensation(self, order_id: uuid.UUID, reason: str, now: datetime) -> None:
        """Turn the order's saga to compensating (due now) and log the cancel request."""
        saga = self._calls.unique_name("compensated_saga")
        self._calls.write(Step(_COMPENSATE_SAGA, (order_id, now), name=saga))
        # Every order gets its saga in the transaction that places it; no saga is a broken invariant.
        self._calls.write(
            Step(
                _LOG_CANCEL_REQUESTED.format(saga=saga),
                (reason, now),
                expect_rows=1,
                conflict=f"order {order_id} has no saga",
                bug=True,
            )
        )

    async def advance(
        self,
        saga_id: uuid.UUID,
        version: int,
        *,
        status: str,
        step: str,
        context: Mapping[str, Any],
        attempts: int,
        last_error: str,
        delay_s: float | None,
        lease_s: float | None,
    ) -> None:
        """Move the execution row on at commit if it is still at `version`; otherwise the commit raises Conflict."""
        self._calls.write(
            Step(
                _ADVANCE_SAGA,
                (saga_id, version, status, step, json.dumps(dict(context)), attempts, last_error, delay_s, lease_s),
                expect_rows=1,
                conflict=f"saga {saga_id} changed concurrently",
            )
        )

    async def keep(
        self, saga_id: uuid.UUID, version: int, *, step: str, context: Mapping[str, Any], lease_s: float
    ) -> None:
        """Move the execution row on to `step` in its status, keeping the lease, if it is still at `version`."""
        self._calls.write(
            Step(
                _KEEP_SAGA,
                (saga_id, version, step, json.dumps(dict(context)), lease_s),
                expect_rows=1,
                conflict=f"saga {saga_id} changed concurrently",
            )
        )

    async def log_step(
        self, saga_id: uuid.UUID, *, step: str, kind: str, outcome: str, detail: str, attempt: int
    ) -> None:
        """Add a step-log row at commit."""
        self._calls.write(Step(_LOG_SAGA_STEP, (saga_id, step, kind, outcome, detail, attempt)))
