"""Runs the steps of one order saga while its worker holds the lease.

A step is a command the saga gives itself: it loads the order (and the products it needs)
through the write side's unit of work, lets the aggregates decide (`Order.reserve_stock`,
`Order.confirm`, `Order.release_stock`, ...), and commits their state and events, the
execution row (version + 1, guarded by the version the worker holds) and its step-log rows
in ONE write, as a command does. A remote call (the payment provider) happens before that
write and is made safe to repeat by an idempotency key derived from the saga id and the
operation, so a crash between the call and the commit only repeats the call.

When the commit's guard on the execution row fails (CancelOrder moved the saga to
compensation meanwhile), what the remote call did is noted in the context and the saga is
planned again from the row as it now is. When only the order or a product moved (a
restock, another order's reservation), the step decides again on a fresh read.

This module keeps only the saga's own state: execution rows, the step log and leases.
"""

from __future__ import annotations

import json
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
from opentelemetry import context as otel_context
from opentelemetry import trace

from shared_kernel.contracts.errors import Conflict
from shared_kernel.contracts.event_log import NewEvent
from shared_kernel.contracts.trace_context import context_from_envelope
from shared_kernel.platform.telemetry import records_spans
from write_service.adapters.unit_of_work import PostgresUnitOfWork
from write_service.domain.catalog import Product
from write_service.domain.orders import Order
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
from write_service.service_layer.deadline import Deadline
from write_service.service_layer.event_bus import handle_domain_events, integration_events
from write_service.service_layer.ports import UnitOfWork, UnitOfWorkFactory

logger = logging.getLogger(__name__)
_tracer = trace.get_tracer("tessera.saga")

PRIMARY = "primary"
SECONDARY = "secondary"

# A step whose order or products moved under it decides again, its reads now locking their
# rows (as a command's retry does), this many times in all; then it counts a failed attempt.
_STEP_CONFLICT_TRIES = 3

SAGA_COLUMNS = "id, order_id, status, current_step, context::text AS context, version, attempts, locked_by"

_LOCK_SAGA = f"SELECT {SAGA_COLUMNS} FROM saga_executions WHERE id = $1 FOR UPDATE"  # noqa: S608 - constant columns
_READ_SAGA = f"SELECT {SAGA_COLUMNS} FROM saga_executions WHERE id = $1"  # noqa: S608 - constant columns

# Used only outside a step (a failed attempt); a step moves the row through the unit of work.
_ADVANCE = """
UPDATE saga_executions
SET status = $3, current_step = $4, context = $5::jsonb, attempts = $6, last_error = $7,
    next_attempt_at = CASE WHEN $8::float8 IS NULL THEN NULL ELSE now() + make_interval(secs => $8::float8) END,
    locked_by = NULL, locked_until = NULL, version = version + 1, updated_at = now()
WHERE id = $1 AND version = $2
"""
_NOTE_CONTEXT = """
UPDATE saga_executions SET context = context || $2::jsonb, version = version + 1, updated_at = now() WHERE id = $1
"""
_INSERT_STEP = """
INSERT INTO saga_steps (saga_id, step, kind, outcome, detail, attempt, at) VALUES ($1, $2, $3, $4, $5, $6, now())
"""
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


@dataclass(frozen=True, slots=True)
class StepLog:
    """One saga_steps row to write."""

    step: str
    outcome: str
    detail: str


@dataclass(frozen=True, slots=True)
class StepOutcome:
    """Where a step leaves the saga: its status and next step, the log, and the new context."""

    status: str
    step: str
    log: list[StepLog]
    context: dict[str, Any] | None = None
    # False: the saga is not due again (it ended); its lease is handed back.
    due: bool = True


@dataclass
class StepWork:
    """What one step's decision works on: its unit of work, the order, and the products it loaded."""

    uow: UnitOfWork
    order: Order
    now: datetime
    products: dict[uuid.UUID, Product] = field(default_factory=dict)

    async def load_products(self, product_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, Product]:
        """The products with these ids, in one read; their saves are guarded by the versions read."""
        found = await self.uow.products.by_ids(sorted(set(product_ids)))
        self.products.update(found)
        return found

    def events(self) -> list[NewEvent]:
        """The events the decision recorded: the order's first, then each product's in id order."""
        recorded = list(self.order.pending_events)
        for product_id in sorted(self.products):
            recorded.extend(self.products[product_id].pending_events)
        return recorded


Decide = Callable[[StepWork], Awaitable[StepOutcome]]


def _released(units: int, products: int) -> str:
    return f"released {units} units of {products} products" if products else "nothing was reserved"


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
        secondary: PaymentProvider | None = None,
        uow_factory: UnitOfWorkFactory | None = None,
    ) -> None:
        self._pool = pool
        self._provider = provider
        # Authorizes when the primary's breaker is open; later calls of that payment go to it too.
        self._secondary = secondary
        self._uow_factory: UnitOfWorkFactory = uow_factory or (lambda deadline: PostgresUnitOfWork(pool, deadline))
        self.worker_id = worker_id
        self._lease_s = lease_s
        # One step's database work must end well within the lease.
        self._step_s = max(1.0, lease_s / 3)
        self._max_attempts = max_attempts
        self._base_ms = backoff_base_ms
        self._cap_ms = backoff_cap_ms
        self._rng = rng or random.Random()  # noqa: S311 - jitter
        # Each order's correlation id and the trace context of the request that placed it, parsed once.
        self._origins: dict[uuid.UUID, tuple[str, otel_context.Context | None]] = {}
        # Decided once: tracing is configured before the runner is built.
        self._record_spans = records_spans()
        self._handlers: dict[str, Callable[[SagaRow, str, str], Awaitable[SagaRow | None]]] = {
            model.RESERVE_STOCK: self._reserve_stock,
            model.AUTHORIZE_PAYMENT: self._authorize_payment,
            model.CAPTURE_AND_CONFIRM: self._capture_and_confirm,
            model.RELEASE_STOCK: self._release_stock,
            model.SETTLE_PAYMENT: self._settle_payment,
        }
        # The order as the last step of a saga in hand committed it: the next step starts from it
        # without reading it again (its save is guarded by the version and status committed).
        self._held: dict[uuid.UUID, Order] = {}
        # Set on shutdown: the saga in hand stops after its current step (its lease is handed back).
        self.stopping = False

    # -- driving

    async def drive(self, saga: SagaRow) -> None:
        """Run steps of a claimed saga until it completes, fails, waits for a retry or leaves this worker."""
        current: SagaRow | None = saga
        try:
            while current is not None and not self.stopping:
                if current.status not in model.ACTIVE_STATUSES or current.locked_by != self.worker_id:
                    return
                try:
                    current = await self.run_step(current)
                except Replan as replan:
                    self._held.pop(saga.id, None)
                    current = replan.saga if replan.saga is not None else await self._reload(saga.id)
        finally:
            # The lease goes back with the saga: another worker may move the order on meanwhile.
            self._held.pop(saga.id, None)
            # A later claim reads the origin again.
            self._origins.pop(saga.order_id, None)

    async def run_step(self, saga: SagaRow) -> SagaRow | None:
        """Run the saga's next step; the row after it when this worker should go on, else None."""
        step = model.step_to_run(saga.status, saga.current_step)
        correlation_id, parent = await self._origin(saga.order_id)
        token = otel_context.attach(parent) if parent is not None else None
        try:
            handler = self._handlers[step]
            if not self._record_spans:
                # Nothing would record the span: the step's logs and events carry the placing request's context.
                return await handler(saga, step, correlation_id)
            with _tracer.start_as_current_span(
                f"saga.{step}", attributes={"saga.id": str(saga.id), "order.id": str(saga.order_id)}
            ):
                return await handler(saga, step, correlation_id)
        finally:
            if token is not None:
                otel_context.detach(token)

    # -- forward steps

    async def _reserve_stock(self, saga: SagaRow, step: str, correlation_id: str) -> SagaRow | None:
        async def decide(work: StepWork) -> StepOutcome:
            order = work.order
            if order.status != "pending":
                # Cancelled before its stock was reserved: nothing to undo but the payment guard.
                detail = f"order is {order.status}, not pending; compensating"
                return StepOutcome(model.COMPENSATING, model.RELEASE_STOCK, [StepLog(step, "failed", detail)])
            products = await work.load_products(order.units_by_product())
            reason = order.reserve_stock(products, now=work.now)
            if reason:
                return StepOutcome(model.COMPLETED, step, [StepLog(step, "failed", reason)], due=False)
            detail = f"reserved {sum(order.reservations.values())} units of {len(order.reservations)} products"
            return StepOutcome(model.RUNNING, model.AUTHORIZE_PAYMENT, [StepLog(step, "succeeded", detail)])

        return await self._run(saga, step, correlation_id, decide, contended=True)

    async def _authorize_payment(self, saga: SagaRow, step: str, correlation_id: str) -> SagaRow | None:
        order = await self._current_order(saga)
        if order is None or order.status != "reserved":
            return await self._out_of_step(saga, step, correlation_id)
        key = model.idempotency_key(saga.id, "authorize")
        args = (str(saga.order_id), order.total_minor, order.currency_code, str(order.customer_id), key)
        via = PRIMARY
        try:
            try:
                result = await self._provider.authorize(*args)
            except CircuitOpen:
                if self._secondary is None:
                    raise
                # The per-step fallback: the primary is known to be down, so this step does not wait for it.
                via = SECONDARY
                logger.info("primary provider's circuit open; authorizing through the secondary")
                result = await self._secondary.authorize(*args)
            approved, authorization_id, reason = result.approved, result.authorization_id, result.decline_reason
        except ProviderRefused as exc:
            approved, authorization_id, reason = False, "", f"the provider refused the authorization ({exc})"
        except (TransientProviderError, CircuitOpen) as exc:
            return await self._remote_failed(saga, step, exc)
        outcome = (
            {"payment": "authorized", "authorization_id": authorization_id} if approved else {"payment": "declined"}
        )
        facts: dict[str, Any] = {**outcome, "provider": via}

        async def decide(work: StepWork) -> StepOutcome:
            order = work.order
            context = {**saga.context, **facts}
            if order.status != "reserved":
                return self._compensate_out_of_step(order, step, context)
            if approved:
                order.authorize_payment(authorization_id=authorization_id, now=work.now)
                log = [StepLog(step, "succeeded", f"authorized as {authorization_id}" + _via(via))]
                return StepOutcome(model.RUNNING, model.CAPTURE_AND_CONFIRM, log, context=context)
            declined = reason or "no reason given"
            order.decline_payment(reason=declined, now=work.now)
            units, products = order.release_stock(await work.load_products(order.reservations), now=work.now)
            order.cancel_by_system(reason=f"payment declined: {declined}", now=work.now)
            log = [
                StepLog(step, "failed", f"declined: {declined}"),
                StepLog(model.RELEASE_STOCK, "succeeded", _released(units, products)),
            ]
            return StepOutcome(model.COMPLETED, step, log, context=context, due=False)

        return await self._run(saga, step, correlation_id, decide, facts=facts)

    async def _capture_and_confirm(self, saga: SagaRow, step: str, correlation_id: str) -> SagaRow | None:
        order = await self._current_order(saga)
        if order is None or order.status != "reserved":
            return await self._out_of_step(saga, step, correlation_id)
        provider = self._provider_of(saga.context)
        try:
            payment = await provider.capture(str(saga.order_id), model.idempotency_key(saga.id, "capture"))
        except ProviderRefused as exc:
            # The authorization is gone (voided, expired): the order cannot be paid any more.
            reason = f"payment capture failed: {exc}"

            async def cancel(work: StepWork) -> StepOutcome:
                work.order.cancel_by_system(reason=reason, now=work.now)
                return StepOutcome(model.COMPENSATING, model.RELEASE_STOCK, [StepLog(step, "failed", reason)])

            return await self._run(saga, step, correlation_id, cancel)
        except (TransientProviderError, CircuitOpen) as exc:
            return await self._remote_failed(saga, step, exc)
        facts = {"payment": "captured", "authorization_id": payment.authorization_id}

        async def decide(work: StepWork) -> StepOutcome:
            order = work.order
            context = {**saga.context, **facts}
            if order.status != "reserved":
                return self._compensate_out_of_step(order, step, context)
            order.confirm(authorization_id=payment.authorization_id, now=work.now)
            log = [StepLog(step, "succeeded", f"captured {payment.authorization_id}; order confirmed")]
            return StepOutcome(model.COMPLETED, step, log, context=context, due=False)

        return await self._run(saga, step, correlation_id, decide, facts=facts)

    async def _out_of_step(self, saga: SagaRow, step: str, correlation_id: str) -> SagaRow | None:
        """The order is not where the step expects it (cancelled meanwhile): re-check, then compensate."""

        async def decide(work: StepWork) -> StepOutcome:
            return self._compensate_out_of_step(work.order, step, None)

        return await self._run(saga, step, correlation_id, decide)

    @staticmethod
    def _compensate_out_of_step(order: Order, step: str, context: dict[str, Any] | None) -> StepOutcome:
        detail = f"order is {order.status}; compensating"
        return StepOutcome(model.COMPENSATING, model.RELEASE_STOCK, [StepLog(step, "failed", detail)], context=context)

    # -- compensation

    async def _release_stock(self, saga: SagaRow, step: str, correlation_id: str) -> SagaRow | None:
        reason = str(saga.context.get("cancel_reason") or "the order's saga compensated")

        async def decide(work: StepWork) -> StepOutcome:
            order = work.order
            order.cancel_by_system(reason=reason, now=work.now)
            units, products = order.release_stock(await work.load_products(order.reservations), now=work.now)
            log = [StepLog(step, "succeeded", _released(units, products))]
            return StepOutcome(model.COMPENSATING, model.SETTLE_PAYMENT, log)

        return await self._run(saga, step, correlation_id, decide, contended=True)

    async def _settle_payment(self, saga: SagaRow, step: str, correlation_id: str) -> SagaRow | None:
        named = saga.context.get("provider")
        # A payment whose provider the context does not name (a crash or a lost answer after the
        # call) is settled at every provider it may have reached.
        if named == SECONDARY and self._secondary is not None:
            providers = [(SECONDARY, self._secondary)]
        elif named == PRIMARY or self._secondary is None:
            providers = [(PRIMARY, self._provider)]
        else:
            providers = [(PRIMARY, self._provider), (SECONDARY, self._secondary)]
        settled: list[Settled] = []
        try:
            for name, provider in providers:
                settled.append(await self._settle_at(provider, saga, name if len(providers) > 1 else ""))
        except (TransientProviderError, CircuitOpen) as exc:
            return await self._remote_failed(saga, step, exc)
        except ProviderRefused as exc:
            # The payment moved between the look-up and the call: count it and look again later.
            return await self._remote_failed(saga, step, exc)
        # The payment that existed decides the facts; with none anywhere, the first provider's.
        main = next((s for s in settled if s.existed), settled[0])
        facts = {"payment": main.state}

        async def decide(work: StepWork) -> StepOutcome:
            for done in settled:
                if done.voided:
                    work.order.record_void(authorization_id=done.voided, now=work.now)
                if done.refund is not None:
                    refund_id, refunded = done.refund
                    work.order.record_refund(
                        refund_id=refund_id,
                        currency_code=refunded.currency_code,
                        amount_minor=refunded.amount_minor,
                        now=work.now,
                    )
            log = [StepLog(step, "succeeded", "; ".join(s.detail for s in settled))]
            return StepOutcome(model.COMPLETED, step, log, context={**saga.context, **facts}, due=False)

        return await self._run(saga, step, correlation_id, decide, facts=facts)

    async def _settle_at(self, provider: PaymentProvider, saga: SagaRow, label: str) -> Settled:
        """Void or refund the order's payment at one provider, whatever state a crash left it in."""
        reference = str(saga.order_id)
        # Ask the provider: a crash after a remote call may have left the context behind it.
        before = await provider.get_payment(reference)
        action = model.settlement_for(before.state if before is not None else None)
        prefix = f"{label}: " if label else ""
        if action == "void":
            after = await provider.void(reference, model.idempotency_key(saga.id, "void"))
            detail = f"voided {after.authorization_id}" if after.authorization_id else "voided before any authorization"
            return Settled(prefix + detail, "voided", before is not None, voided=after.authorization_id)
        if action == "refund":
            refund = await provider.refund(reference, model.idempotency_key(saga.id, "refund"))
            return Settled(
                prefix + f"refunded {refund.refund_id}", "refunded", True, refund=(refund.refund_id, refund.payment)
            )
        state = before.state if before is not None else "none"
        return Settled(prefix + f"nothing to settle: the payment is {state}", state, before is not None)

    def _provider_of(self, context: dict[str, Any]) -> PaymentProvider:
        """The provider that authorized the saga's payment."""
        if context.get("provider") == SECONDARY and self._secondary is not None:
            return self._secondary
        return self._provider

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
                    conn, saga, status=saga.status, attempts=saga.attempts, error="", delay_s=exc.retry_in_s
                )
                logger.info("provider circuit open; saga rescheduled", extra={"saga_id": str(saga.id)})
                return None
            plan = model.plan_failure(saga.attempts, self._max_attempts, self._base_ms, self._cap_ms, self._rng)
            error = f"{step}: {exc}"
            if plan.park:
                await self._write_saga(
                    conn, saga, status=model.FAILED, attempts=plan.attempts, error=error, delay_s=None
                )
                outcome = "failed"
                logger.warning(
                    "saga parked as failed after %d attempts: %s", plan.attempts, error, extra={"saga_id": str(saga.id)}
                )
            else:
                await self._write_saga(
                    conn, saga, status=saga.status, attempts=plan.attempts, error=error, delay_s=plan.delay_s
                )
                outcome = "retrying"
            await conn.execute(_INSERT_STEP, saga.id, step, model.step_kind(step), outcome, error, plan.attempts)
        return None

    # -- the step's unit of work

    async def _run(
        self,
        saga: SagaRow,
        step: str,
        correlation_id: str,
        decide: Decide,
        facts: dict[str, Any] | None = None,
        *,
        contended: bool = False,
    ) -> SagaRow | None:
        """Load the order, `decide`, and commit state, events, execution row and step log in one write.

        On a lost guard: when the execution row moved, note `facts` (what the remote call did)
        in its context and raise Replan; when only the order or a product moved, decide again.
        A `contended` step (one that changes products many orders share) locks what it reads
        from the start: on a popular product, an optimistic write would mostly lose and repeat.
        """
        last: Exception = Conflict(f"saga {saga.id}: the order or its products kept changing")
        for attempt in range(_STEP_CONFLICT_TRIES):
            try:
                return await self._commit_step(saga, step, correlation_id, decide, lock_reads=contended or attempt > 0)
            except Conflict as exc:
                self._held.pop(saga.id, None)
                current = await self._read_saga(saga.id)
                if current is None:
                    raise model.UnknownStep(f"saga {saga.id} is gone") from exc
                if current.version != saga.version:
                    await self._replan(saga, current, step, facts)
                last = exc
        return await self._remote_failed(saga, step, last)

    async def _commit_step(
        self, saga: SagaRow, step: str, correlation_id: str, decide: Decide, *, lock_reads: bool
    ) -> SagaRow | None:
        uow = self._uow_factory(Deadline.after(self._step_s))
        if lock_reads:
            # A retry after a lost guard locks what it reads, so it cannot lose again to a hot product.
            uow.lock_reads()
        async with uow:
            held = None if lock_reads else self._held.pop(saga.id, None)
            if held is not None:
                order: Order | None = held
                uow.orders.adopt(held)
            else:
                order = await uow.orders.get(saga.order_id)
            if order is None:
                raise model.UnknownStep(f"the order {saga.order_id} of saga {saga.id} is gone")
            before = (order.status, order.version, dict(order.reservations))
            work = StepWork(uow=uow, order=order, now=datetime.now(UTC))
            outcome = await decide(work)
            events = integration_events(await handle_domain_events(uow, work.events(), work.now))
            if (order.status, order.version, order.reservations) != before:
                await uow.orders.save(order)
            for product in work.products.values():
                if product.pending_events:
                    await uow.products.save(product)
            await uow.append_events(
                events, correlation_id=correlation_id, causation_id=f"saga:{saga.id}:{step}:{saga.attempts + 1}"
            )
            context = saga.context if outcome.context is None else outcome.context
            keep = outcome.due and outcome.status in model.ACTIVE_STATUSES
            if keep and outcome.status == saga.status:
                # The usual step: on to the next one, still with this worker.
                await uow.sagas.keep(saga.id, saga.version, step=outcome.step, context=context, lease_s=self._lease_s)
            else:
                await uow.sagas.advance(
                    saga.id,
                    saga.version,
                    status=outcome.status,
                    step=outcome.step,
                    context=context,
                    attempts=0,
                    last_error="",
                    delay_s=0.0 if keep else None,
                    lease_s=self._lease_s if keep else None,
                )
            for entry in outcome.log:
                await uow.sagas.log_step(
                    saga.id,
                    step=entry.step,
                    kind=model.step_kind(entry.step),
                    outcome=entry.outcome,
                    detail=entry.detail,
                    attempt=saga.attempts + 1,
                )
            await uow.commit()
        if not keep:
            return None
        order.pending_events.clear()
        for product in work.products.values():
            product.pending_events.clear()
        self._held[saga.id] = order
        return SagaRow(
            id=saga.id,
            order_id=saga.order_id,
            status=outcome.status,
            current_step=outcome.step,
            context=context,
            version=saga.version + 1,
            attempts=0,
            locked_by=self.worker_id,
        )

    async def _replan(self, saga: SagaRow, current: SagaRow, step: str, facts: dict[str, Any] | None) -> None:
        """Note what the remote call did in the changed row's context, then raise Replan."""
        if facts:
            async with self._pool.acquire() as conn, conn.transaction():
                # Committed apart from the step, so compensation knows what the remote call did.
                await conn.execute(_NOTE_CONTEXT, saga.id, json.dumps(facts))
                noted = await conn.fetchrow(_READ_SAGA, saga.id)
            current = saga_from_row(noted) if noted is not None else current
        logger.info("saga changed during %s; planning again", step, extra={"saga_id": str(saga.id), "step": step})
        raise Replan(current if current.locked_by == self.worker_id else None)

    async def _current_order(self, saga: SagaRow) -> Order | None:
        """The order as this worker's last step of the saga committed it, or else as stored now."""
        held = self._held.get(saga.id)
        if held is not None:
            return held
        return await self._read_order(saga.order_id)

    async def _read_order(self, order_id: uuid.UUID) -> Order | None:
        """The order as stored now (one read, nothing written)."""
        async with self._uow_factory(Deadline.after(self._step_s)) as uow:
            return await uow.orders.get(order_id)

    async def _write_saga(
        self,
        conn: Any,
        saga: SagaRow,
        *,
        status: str,
        attempts: int,
        error: str,
        delay_s: float | None,
    ) -> None:
        """Record a failed attempt on the execution row and hand the lease back."""
        result = await conn.execute(
            _ADVANCE,
            saga.id,
            saga.version,
            status,
            saga.current_step,
            json.dumps(saga.context),
            attempts,
            error,
            delay_s,
        )
        if result != "UPDATE 1":
            raise Replan(None)

    def remember_origin(self, order_id: uuid.UUID, origin: tuple[str, str, str]) -> None:
        """Keep the correlation id and trace context of the request that placed the order."""
        if len(self._origins) > 10_000:
            self._origins.clear()
        correlation_id, traceparent, tracestate = origin
        parent = context_from_envelope(traceparent, tracestate) if traceparent else None
        self._origins[order_id] = (correlation_id, parent)

    async def _origin(self, order_id: uuid.UUID) -> tuple[str, otel_context.Context | None]:
        """Correlation id and trace context of the request that placed the order (cached; the claim reads it)."""
        cached = self._origins.get(order_id)
        if cached is not None:
            return cached
        row = await self._pool.fetchrow(_ORIGIN, str(order_id))
        origin = (row["correlation_id"], row["traceparent"], row["tracestate"]) if row else (str(order_id), "", "")
        self.remember_origin(order_id, origin)
        return self._origins[order_id]

    async def _read_saga(self, saga_id: uuid.UUID) -> SagaRow | None:
        row = await self._pool.fetchrow(_READ_SAGA, saga_id)
        return saga_from_row(row) if row is not None else None

    async def _reload(self, saga_id: uuid.UUID) -> SagaRow | None:
        saga = await self._read_saga(saga_id)
        return saga if saga is not None and saga.locked_by == self.worker_id else None


@dataclass(frozen=True, slots=True)
class Settled:
    """What settling the payment at one provider did."""

    detail: str
    state: str
    # Whether the provider had a payment for the order at all.
    existed: bool
    # The authorization id a void released ("" when there was none).
    voided: str = ""
    # The refund's id and the payment it refunded.
    refund: tuple[str, PaymentInfo] | None = None


def _via(name: str) -> str:
    return " through the secondary provider" if name == SECONDARY else ""


__all__ = ["ProviderError", "Replan", "SagaRunner", "saga_from_row"]
