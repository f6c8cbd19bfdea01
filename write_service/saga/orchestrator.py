"""Runs the steps of one order saga while its worker holds the lease.

Every step ends in ONE transaction that locks the order row, then the execution row (then
products, in id order), checks that the execution row is still at the version the worker
last saw, and writes the step's local effects, its outbox events, the execution row
(version + 1) and a step-log row. A remote call (the payment provider) happens before that
transaction and is made safe to repeat by an idempotency key derived from the saga id and
the operation, so a crash between the call and the commit only repeats the call.

When the version check fails (CancelOrder moved the saga to compensation meanwhile), the
step writes nothing but what the remote call did into the context, and the saga is planned
again from the row as it now is.
"""

from __future__ import annotations

import json
import logging
import random
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import asyncpg
from google.protobuf.message import Message
from opentelemetry import context as otel_context
from opentelemetry import trace

from shared_kernel.event_log import NewEvent, append_events
from shared_kernel.telemetry import context_from_envelope
from tessera.catalog.v1 import events_pb2 as catalog_events
from tessera.common.v1.money_pb2 import Money
from tessera.orders.v1 import events_pb2 as order_events
from tessera.orders.v1 import order_pb2
from write_service.saga import model
from write_service.saga.breaker import CircuitOpen
from write_service.saga.model import SagaRow
from write_service.saga.provider import (
    PaymentInfo,
    PaymentProvider,
    ProviderError,
    ProviderRefused,
    TransientProviderError,
)

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection = PoolConnectionProxy[Any]

logger = logging.getLogger(__name__)
_tracer = trace.get_tracer("tessera.saga")

ORDER = "order"
PRODUCT = "product"

_ORDER_STATUS_PB = {
    "pending": order_pb2.ORDER_STATUS_PENDING,
    "reserved": order_pb2.ORDER_STATUS_RESERVED,
    "confirmed": order_pb2.ORDER_STATUS_CONFIRMED,
    "shipped": order_pb2.ORDER_STATUS_SHIPPED,
    "cancelled": order_pb2.ORDER_STATUS_CANCELLED,
    "rejected": order_pb2.ORDER_STATUS_REJECTED,
}

SAGA_COLUMNS = "id, order_id, status, current_step, context::text AS context, version, attempts, locked_by"

_LOCK_ORDER = """
SELECT id, customer_id, status, currency_code, total_minor, version
FROM orders WHERE id = $1 FOR UPDATE
"""
_LOCK_SAGA = f"SELECT {SAGA_COLUMNS} FROM saga_executions WHERE id = $1 FOR UPDATE"  # noqa: S608 - constant columns
_READ_SAGA = f"SELECT {SAGA_COLUMNS} FROM saga_executions WHERE id = $1"  # noqa: S608 - constant columns
_READ_ORDER = "SELECT id, customer_id, status, currency_code, total_minor, version FROM orders WHERE id = $1"

# Keeps or drops the lease in the same statement; next_attempt_at is computed by the
# database clock, the clock the claim query compares with.
_ADVANCE = """
UPDATE saga_executions
SET status = $3, current_step = $4, context = $5::jsonb, attempts = $6, last_error = $7,
    next_attempt_at = CASE WHEN $8::float8 IS NULL THEN NULL ELSE now() + make_interval(secs => $8::float8) END,
    locked_by = CASE WHEN $9 THEN locked_by END,
    locked_until = CASE WHEN $9 THEN now() + make_interval(secs => $10::float8) END,
    version = version + 1, updated_at = now()
WHERE id = $1 AND version = $2
"""
_NOTE_CONTEXT = """
UPDATE saga_executions SET context = context || $2::jsonb, version = version + 1, updated_at = now() WHERE id = $1
"""
_INSERT_STEP = """
INSERT INTO saga_steps (saga_id, step, kind, outcome, detail, attempt, at) VALUES ($1, $2, $3, $4, $5, $6, now())
"""
_ORDER_LINES = "SELECT product_id, sku, quantity FROM order_lines WHERE order_id = $1 ORDER BY product_id"
_LOCK_PRODUCTS = """
SELECT id, sku, stock_available, discontinued, version FROM products WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE
"""
# Both run after the products are locked in id order, so their own row order does not matter.
_TAKE_STOCK = """
UPDATE products AS p SET stock_available = p.stock_available - l.quantity, version = p.version + 1, updated_at = $2
FROM order_lines AS l
WHERE l.order_id = $1 AND p.id = l.product_id
RETURNING p.id, p.stock_available, p.version
"""
_INSERT_RESERVATIONS = """
INSERT INTO stock_reservations (order_id, product_id, quantity, reserved_at)
SELECT order_id, product_id, quantity, $2 FROM order_lines WHERE order_id = $1
"""
_RETURN_STOCK = """
UPDATE products AS p SET stock_available = p.stock_available + r.quantity, version = p.version + 1, updated_at = $2
FROM stock_reservations AS r
WHERE r.order_id = $1 AND r.released_at IS NULL AND p.id = r.product_id
RETURNING p.id, p.sku, p.stock_available, p.version, r.quantity
"""
_OPEN_RESERVATIONS = """
SELECT product_id, quantity FROM stock_reservations
WHERE order_id = $1 AND released_at IS NULL ORDER BY product_id
"""
_STAMP_RELEASED = "UPDATE stock_reservations SET released_at = $2 WHERE order_id = $1 AND released_at IS NULL"
_ORIGIN = """
SELECT correlation_id, traceparent, tracestate FROM outbox
WHERE aggregate_type = 'order' AND aggregate_id = $1 ORDER BY aggregate_version LIMIT 1
"""


class Replan(Exception):
    """The execution row changed under the worker; plan again from `saga`."""

    def __init__(self, saga: SagaRow | None) -> None:
        super().__init__("the saga changed concurrently")
        self.saga = saga


def saga_from_row(row: asyncpg.Record) -> SagaRow:
    """A SagaRow from a row selected with SAGA_COLUMNS."""
    return SagaRow(
        id=row["id"],
        order_id=row["order_id"],
        status=row["status"],
        current_step=row["current_step"],
        context=json.loads(row["context"]),
        version=row["version"],
        attempts=row["attempts"],
        locked_by=row["locked_by"],
    )


def _ts(moment: datetime) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    stamp = Timestamp()
    stamp.FromDatetime(moment.astimezone(UTC))
    return stamp


@dataclass
class StepTx:
    """The open transaction of one step: the locked order and execution rows, and what it will write."""

    conn: Connection
    saga: SagaRow
    order: asyncpg.Record
    now: datetime
    correlation_id: str
    causation_id: str
    order_version: int
    events: list[NewEvent] = field(default_factory=list)

    def order_event(self, payload: Message) -> None:
        """Queue an event on the order, at the order's next version."""
        self.order_version += 1
        self.events.append(NewEvent(payload, ORDER, str(self.saga.order_id), self.order_version, self.now))

    def product_event(self, payload: Message, product_id: object, version: int) -> None:
        """Queue an event on a product, at the version its row update returned."""
        self.events.append(NewEvent(payload, PRODUCT, str(product_id), version, self.now))


@dataclass(frozen=True, slots=True)
class StepLog:
    """One saga_steps row to write."""

    step: str
    outcome: str
    detail: str


class SagaRunner:
    """Drives sagas step by step; one instance per worker, shared by its concurrent sagas."""

    def __init__(
        self,
        pool: asyncpg.Pool[Any],
        provider: PaymentProvider,
        *,
        worker_id: str,
        lease_s: float,
        max_attempts: int,
        backoff_base_ms: int,
        backoff_cap_ms: int,
        rng: random.Random | None = None,
    ) -> None:
        self._pool = pool
        self._provider = provider
        self.worker_id = worker_id
        self._lease_s = lease_s
        self._max_attempts = max_attempts
        self._base_ms = backoff_base_ms
        self._cap_ms = backoff_cap_ms
        self._rng = rng or random.Random()  # noqa: S311 - jitter
        self._origins: dict[uuid.UUID, tuple[str, str, str]] = {}
        # Set on shutdown: the saga in hand stops after its current step (its lease is handed back).
        self.stopping = False

    # -- driving

    async def drive(self, saga: SagaRow) -> None:
        """Run steps of a claimed saga until it completes, fails, waits for a retry or leaves this worker."""
        current: SagaRow | None = saga
        while current is not None and not self.stopping:
            if current.status not in model.ACTIVE_STATUSES or current.locked_by != self.worker_id:
                return
            saga_id = current.id
            try:
                current = await self.run_step(current)
            except Replan as replan:
                current = replan.saga if replan.saga is not None else await self._reload(saga_id)

    async def run_step(self, saga: SagaRow) -> SagaRow | None:
        """Run the saga's next step; the row after it when this worker should go on, else None."""
        step = model.step_to_run(saga.status, saga.current_step)
        correlation_id, traceparent, tracestate = await self._origin(saga.order_id)
        token = otel_context.attach(context_from_envelope(traceparent, tracestate)) if traceparent else None
        try:
            with _tracer.start_as_current_span(
                f"saga.{step}", attributes={"saga.id": str(saga.id), "order.id": str(saga.order_id)}
            ):
                handler = {
                    model.RESERVE_STOCK: self._reserve_stock,
                    model.AUTHORIZE_PAYMENT: self._authorize_payment,
                    model.CAPTURE_AND_CONFIRM: self._capture_and_confirm,
                    model.RELEASE_STOCK: self._release_stock,
                    model.SETTLE_PAYMENT: self._settle_payment,
                }[step]
                return await handler(saga, step, correlation_id)
        finally:
            if token is not None:
                otel_context.detach(token)

    # -- forward steps

    async def _reserve_stock(self, saga: SagaRow, step: str, correlation_id: str) -> SagaRow | None:
        async with self._step(saga, step, correlation_id) as tx:
            if tx.order["status"] != "pending":
                # Cancelled before its stock was reserved: nothing to undo but the payment guard.
                detail = f"order is {tx.order['status']}, not pending; compensating"
                return await self._advance(
                    tx, status=model.COMPENSATING, step=model.RELEASE_STOCK, log=[StepLog(step, "failed", detail)]
                )
            lines = await tx.conn.fetch(_ORDER_LINES, saga.order_id)
            products = {
                row["id"]: row for row in await tx.conn.fetch(_LOCK_PRODUCTS, [line["product_id"] for line in lines])
            }
            shortages = [
                (line["sku"], line["quantity"], products[line["product_id"]]["stock_available"])
                for line in lines
                if line["quantity"] > products[line["product_id"]]["stock_available"]
            ]
            discontinued = [line["sku"] for line in lines if products[line["product_id"]]["discontinued"]]
            if shortages or discontinued or not lines:
                reason = model.shortage_reason(shortages, discontinued) or "the order has no items"
                tx.order_event(
                    order_events.StockReservationFailed(
                        order_id=str(saga.order_id),
                        reason=reason,
                        shortages=[
                            order_events.StockShortage(sku=sku, requested=wanted, available=available)
                            for sku, wanted, available in shortages
                        ],
                        failed_at=_ts(tx.now),
                    )
                )
                tx.order_event(
                    order_events.OrderRejected(order_id=str(saga.order_id), reason=reason, rejected_at=_ts(tx.now))
                )
                await self._set_order(tx, "rejected", reason=reason)
                return await self._advance(
                    tx, status=model.COMPLETED, step=step, log=[StepLog(step, "failed", reason)], due=False
                )
            taken = {row["id"]: row for row in await tx.conn.fetch(_TAKE_STOCK, saga.order_id, tx.now)}
            await tx.conn.execute(_INSERT_RESERVATIONS, saga.order_id, tx.now)
            units = 0
            for line in lines:
                product = taken[line["product_id"]]
                tx.product_event(
                    catalog_events.StockReserved(
                        product_id=str(line["product_id"]),
                        sku=line["sku"],
                        order_id=str(saga.order_id),
                        quantity=line["quantity"],
                        stock_available=product["stock_available"],
                        reserved_at=_ts(tx.now),
                    ),
                    line["product_id"],
                    product["version"],
                )
                units += line["quantity"]
            # The status changes without an order event (the StockReserved events carry the
            # order id), so the order's version stays the number of its events.
            await self._set_order(tx, "reserved")
            detail = f"reserved {units} units of {len(lines)} products"
            return await self._advance(
                tx, status=model.RUNNING, step=model.AUTHORIZE_PAYMENT, log=[StepLog(step, "succeeded", detail)]
            )

    async def _authorize_payment(self, saga: SagaRow, step: str, correlation_id: str) -> SagaRow | None:
        order = await self._pool.fetchrow(_READ_ORDER, saga.order_id)
        if order is None or order["status"] != "reserved":
            return await self._out_of_step(saga, step, correlation_id, order)
        try:
            result = await self._provider.authorize(
                str(saga.order_id),
                order["total_minor"],
                order["currency_code"],
                str(order["customer_id"]),
                model.idempotency_key(saga.id, "authorize"),
            )
            approved, authorization_id, reason = result.approved, result.authorization_id, result.decline_reason
        except ProviderRefused as exc:
            approved, authorization_id, reason = False, "", f"the provider refused the authorization ({exc})"
        except (TransientProviderError, CircuitOpen) as exc:
            return await self._remote_failed(saga, step, exc)
        facts = {"payment": "authorized", "authorization_id": authorization_id} if approved else {"payment": "declined"}
        async with self._step(saga, step, correlation_id, facts=facts) as tx:
            money = Money(currency_code=tx.order["currency_code"], amount_minor=tx.order["total_minor"])
            if approved:
                tx.order_event(
                    order_events.PaymentAuthorized(
                        order_id=str(saga.order_id),
                        authorization_id=authorization_id,
                        amount=money,
                        authorized_at=_ts(tx.now),
                    )
                )
                await self._set_order(tx, "reserved")
                return await self._advance(
                    tx,
                    status=model.RUNNING,
                    step=model.CAPTURE_AND_CONFIRM,
                    context={**saga.context, **facts},
                    log=[StepLog(step, "succeeded", f"authorized as {authorization_id}")],
                )
            reason = reason or "no reason given"
            tx.order_event(
                order_events.PaymentDeclined(order_id=str(saga.order_id), reason=reason, declined_at=_ts(tx.now))
            )
            released = await self._release(tx)
            await self._cancel_order(tx, f"payment declined: {reason}")
            return await self._advance(
                tx,
                status=model.COMPLETED,
                step=step,
                context={**saga.context, **facts},
                log=[
                    StepLog(step, "failed", f"declined: {reason}"),
                    StepLog(model.RELEASE_STOCK, "succeeded", released),
                ],
                due=False,
            )

    async def _capture_and_confirm(self, saga: SagaRow, step: str, correlation_id: str) -> SagaRow | None:
        order = await self._pool.fetchrow(_READ_ORDER, saga.order_id)
        if order is None or order["status"] != "reserved":
            return await self._out_of_step(saga, step, correlation_id, order)
        try:
            payment = await self._provider.capture(str(saga.order_id), model.idempotency_key(saga.id, "capture"))
        except ProviderRefused as exc:
            # The authorization is gone (voided, expired): the order cannot be paid any more.
            async with self._step(saga, step, correlation_id) as tx:
                reason = f"payment capture failed: {exc}"
                await self._cancel_order(tx, reason)
                return await self._advance(
                    tx,
                    status=model.COMPENSATING,
                    step=model.RELEASE_STOCK,
                    log=[StepLog(step, "failed", reason)],
                )
        except (TransientProviderError, CircuitOpen) as exc:
            return await self._remote_failed(saga, step, exc)
        facts = {"payment": "captured", "authorization_id": payment.authorization_id}
        async with self._step(saga, step, correlation_id, facts=facts) as tx:
            money = Money(currency_code=tx.order["currency_code"], amount_minor=tx.order["total_minor"])
            tx.order_event(
                order_events.PaymentCaptured(
                    order_id=str(saga.order_id),
                    authorization_id=payment.authorization_id,
                    amount=money,
                    captured_at=_ts(tx.now),
                )
            )
            tx.order_event(
                order_events.OrderConfirmed(order_id=str(saga.order_id), total=money, confirmed_at=_ts(tx.now))
            )
            await self._set_order(tx, "confirmed")
            return await self._advance(
                tx,
                status=model.COMPLETED,
                step=step,
                context={**saga.context, **facts},
                log=[StepLog(step, "succeeded", f"captured {payment.authorization_id}; order confirmed")],
                due=False,
            )

    async def _out_of_step(
        self, saga: SagaRow, step: str, correlation_id: str, order: asyncpg.Record | None
    ) -> SagaRow | None:
        """The order is not where the step expects it (cancelled meanwhile): re-check, then compensate."""
        async with self._step(saga, step, correlation_id) as tx:
            detail = f"order is {tx.order['status']}; compensating"
            return await self._advance(
                tx, status=model.COMPENSATING, step=model.RELEASE_STOCK, log=[StepLog(step, "failed", detail)]
            )

    # -- compensation

    async def _release_stock(self, saga: SagaRow, step: str, correlation_id: str) -> SagaRow | None:
        async with self._step(saga, step, correlation_id) as tx:
            if tx.order["status"] in ("pending", "reserved", "confirmed"):
                await self._cancel_order(tx, str(saga.context.get("cancel_reason") or "the order's saga compensated"))
            released = await self._release(tx)
            return await self._advance(
                tx, status=model.COMPENSATING, step=model.SETTLE_PAYMENT, log=[StepLog(step, "succeeded", released)]
            )

    async def _settle_payment(self, saga: SagaRow, step: str, correlation_id: str) -> SagaRow | None:
        reference = str(saga.order_id)
        event: Message | None = None
        try:
            # Ask the provider: a crash after a remote call may have left the context behind it.
            before = await self._provider.get_payment(reference)
            action = model.settlement_for(before.state if before is not None else None)
            now = datetime.now(UTC)
            if action == "void":
                after = await self._provider.void(reference, model.idempotency_key(saga.id, "void"))
                detail = (
                    f"voided {after.authorization_id}" if after.authorization_id else "voided before any authorization"
                )
                if after.authorization_id:
                    event = order_events.PaymentVoided(
                        order_id=reference, authorization_id=after.authorization_id, voided_at=_ts(now)
                    )
                facts = {"payment": "voided"}
            elif action == "refund":
                assert before is not None
                refund = await self._provider.refund(reference, model.idempotency_key(saga.id, "refund"))
                detail = f"refunded {refund.refund_id}"
                event = order_events.PaymentRefunded(
                    order_id=reference,
                    refund_id=refund.refund_id,
                    amount=_money(refund.payment),
                    refunded_at=_ts(now),
                )
                facts = {"payment": "refunded"}
            else:
                state = before.state if before is not None else "none"
                detail = f"nothing to settle: the payment is {state}"
                facts = {"payment": state}
        except (TransientProviderError, CircuitOpen) as exc:
            return await self._remote_failed(saga, step, exc)
        except ProviderRefused as exc:
            # The payment moved between the look-up and the call: count it and look again later.
            return await self._remote_failed(saga, step, exc)
        async with self._step(saga, step, correlation_id, facts=facts) as tx:
            if event is not None:
                tx.order_event(event)
            return await self._advance(
                tx,
                status=model.COMPLETED,
                step=step,
                context={**saga.context, **facts},
                log=[StepLog(step, "succeeded", detail)],
                due=False,
            )

    async def _release(self, tx: StepTx) -> str:
        """Return every unreleased reservation of the order to stock, one StockReleased per product."""
        rows = await tx.conn.fetch(_OPEN_RESERVATIONS, tx.saga.order_id)
        if not rows:
            return "nothing was reserved"
        await tx.conn.fetch(_LOCK_PRODUCTS, [row["product_id"] for row in rows])
        units = 0
        for back in sorted(await tx.conn.fetch(_RETURN_STOCK, tx.saga.order_id, tx.now), key=lambda r: r["id"]):
            tx.product_event(
                catalog_events.StockReleased(
                    product_id=str(back["id"]),
                    sku=back["sku"],
                    order_id=str(tx.saga.order_id),
                    quantity=back["quantity"],
                    stock_available=back["stock_available"],
                    released_at=_ts(tx.now),
                ),
                back["id"],
                back["version"],
            )
            units += back["quantity"]
        await tx.conn.execute(_STAMP_RELEASED, tx.saga.order_id, tx.now)
        return f"released {units} units of {len(rows)} products"

    async def _cancel_order(self, tx: StepTx, reason: str) -> None:
        """Cancel the order as the system (an OrderCancelled event), unless it already ended."""
        previous = tx.order["status"]
        if previous in ("cancelled", "rejected", "shipped"):
            return
        tx.order_event(
            order_events.OrderCancelled(
                order_id=str(tx.saga.order_id),
                reason=reason,
                cancelled_by="system",
                previous_status=_ORDER_STATUS_PB[previous],
                cancelled_at=_ts(tx.now),
            )
        )
        await self._set_order(tx, "cancelled", reason=reason, cancelled_by="system")

    # -- failures

    async def fail_unexpected(self, saga_id: uuid.UUID, exc: BaseException) -> None:
        """Count an attempt for a step that raised something unexpected (a bug, a database error)."""
        saga = await self._reload(saga_id)
        if saga is None or saga.status not in model.ACTIVE_STATUSES:
            return
        try:
            step = model.step_to_run(saga.status, saga.current_step)
        except model.UnknownStep:
            step = saga.current_step
        try:
            await self._remote_failed(saga, step, RuntimeError(f"{type(exc).__name__}: {exc}"))
        except Replan:
            return

    async def _remote_failed(self, saga: SagaRow, step: str, exc: Exception) -> SagaRow | None:
        """A remote call failed: reschedule (breaker open), retry with backoff, or park after the cap."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(_LOCK_SAGA, saga.id)
            current = saga_from_row(row) if row is not None else None
            if current is None or current.version != saga.version:
                raise Replan(current if current is not None and current.locked_by == self.worker_id else None)
            if isinstance(exc, CircuitOpen):
                # Not the saga's fault: wait for the breaker without spending an attempt.
                await self._write_saga(
                    conn,
                    saga,
                    status=saga.status,
                    step=saga.current_step,
                    context=saga.context,
                    attempts=saga.attempts,
                    last_error="",
                    delay_s=exc.retry_in_s,
                    keep_lease=False,
                )
                logger.info("provider circuit open; saga rescheduled", extra={"saga_id": str(saga.id)})
                return None
            plan = model.plan_failure(saga.attempts, self._max_attempts, self._base_ms, self._cap_ms, self._rng)
            error = f"{step}: {exc}"
            if plan.park:
                await self._write_saga(
                    conn,
                    saga,
                    status=model.FAILED,
                    step=saga.current_step,
                    context=saga.context,
                    attempts=plan.attempts,
                    last_error=error,
                    delay_s=None,
                    keep_lease=False,
                )
                outcome = "failed"
                logger.warning(
                    "saga parked as failed after %d attempts: %s", plan.attempts, error, extra={"saga_id": str(saga.id)}
                )
            else:
                await self._write_saga(
                    conn,
                    saga,
                    status=saga.status,
                    step=saga.current_step,
                    context=saga.context,
                    attempts=plan.attempts,
                    last_error=error,
                    delay_s=plan.delay_s,
                    keep_lease=False,
                )
                outcome = "retrying"
            await conn.execute(_INSERT_STEP, saga.id, step, model.step_kind(step), outcome, error, plan.attempts)
        return None

    # -- transaction plumbing

    @asynccontextmanager
    async def _step(
        self, saga: SagaRow, step: str, correlation_id: str, facts: dict[str, Any] | None = None
    ) -> AsyncIterator[StepTx]:
        """Open the step's transaction with the order and execution rows locked and the version checked.

        On a version mismatch, what the remote call did (`facts`) is noted in the context and
        Replan is raised with the row as it now is.
        """
        replan: Replan | None = None
        async with self._pool.acquire() as conn, conn.transaction():
            order = await conn.fetchrow(_LOCK_ORDER, saga.order_id)
            row = await conn.fetchrow(_LOCK_SAGA, saga.id)
            current = saga_from_row(row) if row is not None else None
            if order is None or current is None:
                raise model.UnknownStep(f"saga {saga.id} or its order {saga.order_id} is gone")
            if current.version == saga.version:
                yield StepTx(
                    conn=conn,
                    saga=current,
                    order=order,
                    now=datetime.now(UTC),
                    correlation_id=correlation_id,
                    causation_id=f"saga:{saga.id}:{step}:{saga.attempts + 1}",
                    order_version=order["version"],
                )
                return
            if facts:
                # Committed with this transaction, so compensation knows what the remote call did.
                await conn.execute(_NOTE_CONTEXT, saga.id, json.dumps(facts))
                noted = await conn.fetchrow(_READ_SAGA, saga.id)
                current = saga_from_row(noted) if noted is not None else current
            logger.info("saga changed during %s; planning again", step, extra={"saga_id": str(saga.id), "step": step})
            replan = Replan(current if current.locked_by == self.worker_id else None)
        raise replan

    async def _advance(
        self,
        tx: StepTx,
        *,
        status: str,
        step: str,
        log: list[StepLog],
        context: dict[str, Any] | None = None,
        due: bool = True,
    ) -> SagaRow | None:
        """Write the events, the execution row and the step log; the new row if the worker goes on."""
        saga = tx.saga
        await append_events(tx.conn, tx.events, correlation_id=tx.correlation_id, causation_id=tx.causation_id)
        if tx.order_version > tx.order["version"]:
            # Events on the order (PaymentVoided, PaymentRefunded, ...) move its version even when
            # its status stays, so that the row's version is always the number of its events.
            await tx.conn.execute(
                "UPDATE orders SET version = $2, updated_at = $3 WHERE id = $1 AND version < $2",
                tx.saga.order_id,
                tx.order_version,
                tx.now,
            )
        new_context = saga.context if context is None else context
        keep = due and status in model.ACTIVE_STATUSES
        await self._write_saga(
            tx.conn,
            saga,
            status=status,
            step=step,
            context=new_context,
            attempts=0,
            last_error="",
            delay_s=0.0 if keep else None,
            keep_lease=keep,
        )
        for entry in log:
            await tx.conn.execute(
                _INSERT_STEP,
                saga.id,
                entry.step,
                model.step_kind(entry.step),
                entry.outcome,
                entry.detail,
                saga.attempts + 1,
            )
        if not keep:
            return None
        return SagaRow(
            id=saga.id,
            order_id=saga.order_id,
            status=status,
            current_step=step,
            context=new_context,
            version=saga.version + 1,
            attempts=0,
            locked_by=self.worker_id,
        )

    async def _write_saga(
        self,
        conn: Connection,
        saga: SagaRow,
        *,
        status: str,
        step: str,
        context: dict[str, Any],
        attempts: int,
        last_error: str,
        delay_s: float | None,
        keep_lease: bool,
    ) -> None:
        result = await conn.execute(
            _ADVANCE,
            saga.id,
            saga.version,
            status,
            step,
            json.dumps(context),
            attempts,
            last_error,
            delay_s,
            keep_lease,
            self._lease_s,
        )
        if result != "UPDATE 1":
            raise Replan(None)

    async def _set_order(self, tx: StepTx, status: str, *, reason: str | None = None, cancelled_by: str = "") -> None:
        await tx.conn.execute(
            """
            UPDATE orders SET status = $2, version = $3, updated_at = $4,
                reason = coalesce($5, reason), cancelled_by = CASE WHEN $6 = '' THEN cancelled_by ELSE $6 END
            WHERE id = $1
            """,
            tx.saga.order_id,
            status,
            tx.order_version,
            tx.now,
            reason,
            cancelled_by,
        )

    async def _origin(self, order_id: uuid.UUID) -> tuple[str, str, str]:
        """Correlation id and trace context of the request that placed the order (cached)."""
        cached = self._origins.get(order_id)
        if cached is not None:
            return cached
        row = await self._pool.fetchrow(_ORIGIN, str(order_id))
        origin = (row["correlation_id"], row["traceparent"], row["tracestate"]) if row else (str(order_id), "", "")
        if len(self._origins) > 10_000:
            self._origins.clear()
        self._origins[order_id] = origin
        return origin

    async def _reload(self, saga_id: uuid.UUID) -> SagaRow | None:
        row = await self._pool.fetchrow(_READ_SAGA, saga_id)
        if row is None:
            return None
        saga = saga_from_row(row)
        return saga if saga.locked_by == self.worker_id else None


def _money(payment: PaymentInfo) -> Money:
    return Money(currency_code=payment.currency_code, amount_minor=payment.amount_minor)


__all__ = ["ProviderError", "Replan", "SagaRunner", "saga_from_row"]
