"""Orders and the saga hand-off in Postgres: `orders`, `order_lines`, `saga_executions`, `saga_steps`."""

from __future__ import annotations

import dataclasses
import json
import uuid
from datetime import datetime
from typing import Any

from shared_kernel import errors
from write_service.adapters.pg_calls import Calls
from write_service.domain import orders
from write_service.service_layer.ports import OrderRepository, SagaHandoff

ORDER_COLUMNS = (
    "id, customer_id, status, currency_code, total_minor, shipping_address, notes, reason, cancelled_by, "
    "carrier, tracking_number, version, placed_at, updated_at"
)

_SELECT_FOR_UPDATE = f"SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1 FOR UPDATE"  # noqa: S608 - constant

_SELECT_LINES = """
SELECT line_no, product_id, sku, product_name, unit_price_minor, quantity
FROM order_lines WHERE order_id = $1 ORDER BY line_no
"""

_INSERT = f"""
INSERT INTO orders ({ORDER_COLUMNS})
VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10, $11, $12, $13, $14)
"""  # noqa: S608 - constant columns

_UPDATE = """
UPDATE orders
SET status = $2, total_minor = $3, reason = $4, cancelled_by = $5, carrier = $6, tracking_number = $7,
    version = $8, updated_at = $9
WHERE id = $1 AND version = $10
"""

# A line's price, product and name never change; only a new line or a larger quantity is written.
_UPSERT_LINE = """
INSERT INTO order_lines (order_id, line_no, product_id, sku, product_name, unit_price_minor, quantity)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (order_id, line_no) DO UPDATE SET quantity = EXCLUDED.quantity
WHERE order_lines.quantity IS DISTINCT FROM EXCLUDED.quantity
"""

# The saga starts due now at its first step; the saga worker (write_service.saga) takes it on.
_START_SAGA = """
INSERT INTO saga_executions (id, saga_type, order_id, status, current_step, context, version, attempts,
                             next_attempt_at, created_at, updated_at)
VALUES ($1, 'place_order', $2, 'running', 'reserve_stock', '{}'::jsonb, 1, 0, $3, $3, $3)
"""

_LOCK_SAGA = "SELECT id FROM saga_executions WHERE order_id = $1 FOR UPDATE"

# Whatever state the saga is in (completed and failed included), it now has to undo what it did.
_COMPENSATE_SAGA = """
UPDATE saga_executions
SET status = 'compensating', current_step = 'compensate', attempts = 0, last_error = '',
    next_attempt_at = $2, version = version + 1, updated_at = $2
WHERE id = $1
"""

_LOG_CANCEL_REQUESTED = """
INSERT INTO saga_steps (saga_id, step, kind, outcome, detail, attempt, at)
VALUES ($1, 'cancel_requested', 'compensate', 'succeeded', $2, 1, $3)
"""


def _address_json(address: orders.Address) -> str:
    return json.dumps(dataclasses.asdict(address), sort_keys=True)


def _address(text: str) -> orders.Address:
    fields: dict[str, Any] = json.loads(text)
    return orders.Address(**fields)


class PostgresOrderRepository(OrderRepository):
    """Orders and their lines, read and written on the unit of work's connection."""

    def __init__(self, calls: Calls) -> None:
        self._calls = calls

    async def get_for_update(self, order_id: uuid.UUID) -> orders.Order | None:
        """The order row locked FOR UPDATE (as the saga's steps lock it), with its lines."""
        conn = self._calls.conn
        row = await self._calls.run(conn.fetchrow(_SELECT_FOR_UPDATE, order_id))
        if row is None:
            return None
        lines = await self._calls.run(conn.fetch(_SELECT_LINES, order_id))
        return orders.Order(
            id=row["id"],
            customer_id=row["customer_id"],
            status=row["status"],
            currency_code=row["currency_code"],
            lines=[
                orders.OrderLine(
                    line_no=line["line_no"],
                    product_id=line["product_id"],
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
        )

    async def add(self, order: orders.Order) -> None:
        """Insert the order and its lines."""
        conn = self._calls.conn
        await self._calls.run(
            conn.execute(
                _INSERT,
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
            )
        )
        await self._write_lines(order)
        order.stored_version = order.version

    async def save(self, order: orders.Order) -> None:
        """Update the order if it is still at the version loaded (else Conflict), then its lines."""
        status = await self._calls.run(
            self._calls.conn.execute(
                _UPDATE,
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
            )
        )
        if status != "UPDATE 1":
            # FOR UPDATE makes this unreachable in practice; it guards against a caller that skipped it.
            raise errors.Conflict(f"order {order.id} changed concurrently, retry the request")
        await self._write_lines(order)
        order.stored_version = order.version

    async def _write_lines(self, order: orders.Order) -> None:
        await self._calls.run(
            self._calls.conn.executemany(
                _UPSERT_LINE,
                [
                    (
                        order.id,
                        line.line_no,
                        line.product_id,
                        line.sku,
                        line.product_name,
                        line.unit_price_minor,
                        line.quantity,
                    )
                    for line in order.lines
                ],
            )
        )


class PostgresSagaHandoff(SagaHandoff):
    """Starts sagas and asks them to compensate, on the unit of work's connection."""

    def __init__(self, calls: Calls) -> None:
        self._calls = calls

    async def start(self, saga_id: uuid.UUID, order_id: uuid.UUID, now: datetime) -> None:
        """Insert the running place_order saga, due now at reserve_stock."""
        await self._calls.run(self._calls.conn.execute(_START_SAGA, saga_id, order_id, now))

    async def request_compensation(self, order_id: uuid.UUID, reason: str, now: datetime) -> None:
        """Lock the order's saga, turn it to compensating (due now) and log the cancel request."""
        conn = self._calls.conn
        saga_id = await self._calls.run(conn.fetchval(_LOCK_SAGA, order_id))
        if saga_id is None:
            # Every order gets its saga in the transaction that places it; this is a broken invariant.
            raise RuntimeError(f"order {order_id} has no saga")
        await self._calls.run(conn.execute(_COMPENSATE_SAGA, saga_id, now))
        await self._calls.run(conn.execute(_LOG_CANCEL_REQUESTED, saga_id, reason, now))
