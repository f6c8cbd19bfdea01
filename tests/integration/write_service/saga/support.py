"""Seeding orders straight into Postgres, a real payment provider process, and a worker in this loop."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeAlias

import asyncpg
import grpc

from shared_kernel.contracts.event_log import NewEvent, append_events
from tessera.common.v1.money_pb2 import Money
from tessera.orders.v1 import events_pb2 as order_events
from tessera.payments.v1 import payment_provider_admin_pb2 as admin_pb
from tessera.payments.v1 import payment_provider_admin_pb2_grpc as admin_grpc
from tessera.payments.v1 import payment_provider_pb2 as pb
from tessera.payments.v1 import payment_provider_pb2_grpc as pb_grpc
from write_service.saga.breaker import CircuitBreaker
from write_service.saga.orchestrator import SagaRunner
from write_service.saga.provider import (
    AuthorizeResult,
    GrpcPaymentProvider,
    GuardedProvider,
    PaymentInfo,
    PaymentProvider,
    RefundResult,
)
from write_service.saga.worker import SagaWorker

CALL_TIMEOUT_S = 5.0

# The address PlaceOrder stores (write_service.adapters.orders), as JSON.
SHIPPING_ADDRESS = (
    '{"city": "Berlin", "country_code": "DE", "line1": "1 Test Street", "line2": "", '
    '"postal_code": "10115", "recipient": "Test Customer"}'
)

# The statement CancelOrder runs on the saga (write_service.adapters.orders), with the
# order's own change, in one transaction.
CANCEL_ORDER_SQL = """
UPDATE orders SET status = 'cancelled', reason = $2, cancelled_by = 'tester', version = version + 1,
    updated_at = now() WHERE id = $1
"""
COMPENSATE_SAGA_SQL = """
UPDATE saga_executions
SET status = 'compensating', current_step = 'compensate', attempts = 0, last_error = '',
    next_attempt_at = now(), version = version + 1, updated_at = now()
WHERE order_id = $1
"""


async def add_user(pool: asyncpg.Pool[Any]) -> uuid.UUID:
    """An active user to place orders for."""
    user_id = uuid.uuid4()
    email = f"{user_id.hex[:10]}@example.com"
    await pool.execute(
        "INSERT INTO users (id, email, email_key, username, password_hash, full_name, version, created_at, updated_at)"
        " VALUES ($1, $2, $2, $3, 'x', 'Test Customer', 1, now(), now())",
        user_id,
        email,
        f"u{user_id.hex[:12]}",
    )
    return user_id


async def add_product(
    pool: asyncpg.Pool[Any], stock: int, price_minor: int = 1000, *, discontinued: bool = False
) -> tuple[uuid.UUID, str]:
    """A product with `stock` units; returns its id and sku."""
    product_id = uuid.uuid4()
    sku = f"SKU-{product_id.hex[:8].upper()}"
    await pool.execute(
        "INSERT INTO products (id, sku, name, currency_code, price_minor, stock_available, discontinued, version,"
        " created_at, updated_at) VALUES ($1, $2, $3, 'EUR', $4, $5, $6, 1, now(), now())",
        product_id,
        sku,
        f"Product {sku}",
        price_minor,
        stock,
        discontinued,
    )
    return product_id, sku


async def place_order(
    pool: asyncpg.Pool[Any], customer_id: uuid.UUID, items: Sequence[tuple[uuid.UUID, int]]
) -> uuid.UUID:
    """What PlaceOrder commits: the pending order, its lines, OrderPlaced and the saga due now."""
    order_id = uuid.uuid4()
    now = datetime.now(UTC)
    async with pool.acquire() as conn, conn.transaction():
        total = 0
        lines = []
        for line_no, (product_id, quantity) in enumerate(items, start=1):
            product = await conn.fetchrow("SELECT sku, name, price_minor FROM products WHERE id = $1", product_id)
            assert product is not None
            total += product["price_minor"] * quantity
            lines.append(
                (order_id, line_no, product_id, product["sku"], product["name"], product["price_minor"], quantity)
            )
        await conn.execute(
            "INSERT INTO orders (id, customer_id, status, currency_code, total_minor, shipping_address, version,"
            " placed_at, updated_at) VALUES ($1, $2, 'pending', 'EUR', $3, $5::jsonb, 1, $4, $4)",
            order_id,
            customer_id,
            total,
            now,
            SHIPPING_ADDRESS,
        )
        await conn.executemany(
            "INSERT INTO order_lines (order_id, line_no, product_id, sku, product_name, unit_price_minor, quantity)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)",
            lines,
        )
        placed = order_events.OrderPlaced(
            order_id=str(order_id), customer_id=str(customer_id), total=Money(currency_code="EUR", amount_minor=total)
        )
        await append_events(
            conn,
            [NewEvent(placed, "order", str(order_id), 1, now)],
            correlation_id=f"corr-{order_id.hex[:8]}",
            causation_id="place",
        )
        await conn.execute(
            "INSERT INTO saga_executions (id, saga_type, order_id, status, current_step, context, version, attempts,"
            " next_attempt_at, created_at, updated_at)"
            " VALUES ($1, 'place_order', $2, 'running', 'reserve_stock', '{}'::jsonb, 1, 0, $3, $3, $3)",
            uuid.uuid4(),
            order_id,
            now,
        )
    return order_id


async def cancel_order(pool: asyncpg.Pool[Any], order_id: uuid.UUID, reason: str = "changed my mind") -> None:
    """What CancelOrder commits: the order cancelled and its saga asked to compensate."""
    async with pool.acquire() as conn, conn.transaction():
        version = await conn.fetchval("SELECT version FROM orders WHERE id = $1 FOR UPDATE", order_id)
        await conn.execute(CANCEL_ORDER_SQL, order_id, reason)
        cancelled = order_events.OrderCancelled(order_id=str(order_id), reason=reason, cancelled_by="tester")
        await append_events(
            conn,
            [NewEvent(cancelled, "order", str(order_id), version + 1, datetime.now(UTC))],
            correlation_id=f"corr-{order_id.hex[:8]}",
            causation_id="cancel",
        )
        await conn.execute(COMPENSATE_SAGA_SQL, order_id)


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll `check` until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def wait_sagas_settled(pool: asyncpg.Pool[Any], timeout: float = 30.0) -> None:
    """Until no saga is running or compensating."""

    async def settled() -> bool:
        active = await pool.fetchval("SELECT count(*) FROM saga_executions WHERE status IN ('running', 'compensating')")
        return bool(active == 0)

    await wait_until(settled, timeout, "every saga to settle")


async def configure_provider(channel: grpc.aio.Channel, **fields: Any) -> None:
    """Replace the provider's failure configuration."""
    await admin_grpc.PaymentProviderAdminServiceStub(channel).Configure(
        admin_pb.ConfigureRequest(configuration=admin_pb.FailureConfiguration(**fields)), timeout=CALL_TIMEOUT_S
    )


async def payment(channel: grpc.aio.Channel, order_id: uuid.UUID) -> pb.Payment | None:
    """The provider's payment for the order, or None."""
    try:
        reply = await pb_grpc.PaymentProviderServiceStub(channel).GetPayment(
            pb.GetPaymentRequest(reference=str(order_id)), timeout=CALL_TIMEOUT_S
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise
    return reply.payment


@dataclass
class Settings:
    """Worker knobs the tests turn."""

    lease_s: float = 5.0
    max_attempts: int = 5
    backoff_base_ms: int = 10
    backoff_cap_ms: int = 50
    breaker_threshold: int = 50
    breaker_cooldown_s: float = 0.2
    timeout_s: float = 1.0
    concurrency: int = 8
    poll_interval_s: float = 0.2


Wrap: TypeAlias = Callable[[PaymentProvider], PaymentProvider]


def make_runner(
    pool: asyncpg.Pool[Any],
    channel: grpc.aio.Channel,
    settings: Settings,
    worker_id: str = "test-worker",
    wrap: Wrap | None = None,
    secondary: grpc.aio.Channel | None = None,
) -> SagaRunner:
    """A runner over the real provider behind a breaker (`wrap` may put a test hook around the provider).

    With `secondary`, a second real provider (behind a breaker of its own) authorizes while
    the first one's breaker is open.
    """
    real: PaymentProvider = GrpcPaymentProvider(channel, settings.timeout_s)
    provider = GuardedProvider(
        wrap(real) if wrap is not None else real,
        CircuitBreaker(settings.breaker_threshold, settings.breaker_cooldown_s),
    )
    fallback = None
    if secondary is not None:
        fallback = GuardedProvider(
            GrpcPaymentProvider(secondary, settings.timeout_s),
            CircuitBreaker(settings.breaker_threshold, settings.breaker_cooldown_s),
        )
    return SagaRunner(
        pool,
        provider,
        worker_id=worker_id,
        lease_s=settings.lease_s,
        max_attempts=settings.max_attempts,
        backoff_base_ms=settings.backoff_base_ms,
        backoff_cap_ms=settings.backoff_cap_ms,
        secondary=fallback,
    )


@asynccontextmanager
async def running_worker(
    pool: asyncpg.Pool[Any],
    database_url: str,
    channel: grpc.aio.Channel,
    settings: Settings | None = None,
    worker_id: str = "test-worker",
    wrap: Wrap | None = None,
    secondary: grpc.aio.Channel | None = None,
) -> AsyncIterator[SagaWorker]:
    """A SagaWorker running in this loop until the block ends."""
    settings = settings or Settings()
    runner = make_runner(pool, channel, settings, worker_id, wrap, secondary)

    async def connect() -> asyncpg.Connection[Any]:
        conn: asyncpg.Connection[Any] = await asyncpg.connect(database_url)
        return conn

    worker = SagaWorker(
        pool,
        runner,
        connect,
        concurrency=settings.concurrency,
        lease_s=settings.lease_s,
        poll_interval_s=settings.poll_interval_s,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop, grace_s=2.0))
    try:
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def order_row(pool: asyncpg.Pool[Any], order_id: uuid.UUID) -> asyncpg.Record:
    """The order's row."""
    row: asyncpg.Record | None = await pool.fetchrow(
        "SELECT status, reason, cancelled_by, version FROM orders WHERE id = $1", order_id
    )
    assert row is not None
    return row


async def saga_row(pool: asyncpg.Pool[Any], order_id: uuid.UUID) -> asyncpg.Record:
    """The order's saga row."""
    row: asyncpg.Record | None = await pool.fetchrow(
        "SELECT id, status, current_step, attempts, last_error, version, locked_by, context::text AS context"
        " FROM saga_executions WHERE order_id = $1",
        order_id,
    )
    assert row is not None
    return row


async def stock(pool: asyncpg.Pool[Any], product_id: uuid.UUID) -> int:
    """Units available of the product."""
    value = await pool.fetchval("SELECT stock_available FROM products WHERE id = $1", product_id)
    return int(value)


async def order_events_of(pool: asyncpg.Pool[Any], order_id: uuid.UUID) -> list[tuple[str, int]]:
    """(event type short name, aggregate version) of the order's events, in version order."""
    rows = await pool.fetch(
        "SELECT event_type, aggregate_version FROM outbox WHERE aggregate_type = 'order' AND aggregate_id = $1"
        " ORDER BY aggregate_version",
        str(order_id),
    )
    return [(row["event_type"].rsplit(".", 1)[1], row["aggregate_version"]) for row in rows]


async def product_events_of(pool: asyncpg.Pool[Any], order_id: uuid.UUID) -> list[str]:
    """Short names of the catalog events about the order's stock, in insertion order."""
    rows = await pool.fetch(
        "SELECT event_type FROM outbox WHERE aggregate_type = 'product' AND correlation_id = $1 ORDER BY id",
        f"corr-{order_id.hex[:8]}",
    )
    return [row["event_type"].rsplit(".", 1)[1] for row in rows]


async def steps_of(pool: asyncpg.Pool[Any], order_id: uuid.UUID) -> list[tuple[str, str, str]]:
    """(step, kind, outcome) of the saga's step log, oldest first."""
    rows = await pool.fetch(
        "SELECT s.step, s.kind, s.outcome FROM saga_steps s JOIN saga_executions e ON e.id = s.saga_id"
        " WHERE e.order_id = $1 ORDER BY s.id",
        order_id,
    )
    return [(row["step"], row["kind"], row["outcome"]) for row in rows]


class HeldAuthorization:
    """Passes every call to the real provider, but holds the answer to Authorize until released.

    The authorization happens at the provider; only its answer waits, so a test can commit
    something (a cancel) between the remote effect and the step's transaction.
    """

    def __init__(self, inner: PaymentProvider) -> None:
        self.inner = inner
        self.authorized = asyncio.Event()
        self.release = asyncio.Event()

    async def authorize(
        self, reference: str, amount_minor: int, currency_code: str, customer_id: str, idempotency_key: str
    ) -> AuthorizeResult:
        """The real Authorize, then wait for `release`."""
        result = await self.inner.authorize(reference, amount_minor, currency_code, customer_id, idempotency_key)
        self.authorized.set()
        await self.release.wait()
        return result

    async def capture(self, reference: str, idempotency_key: str) -> PaymentInfo:
        """The real Capture."""
        return await self.inner.capture(reference, idempotency_key)

    async def void(self, reference: str, idempotency_key: str) -> PaymentInfo:
        """The real Void."""
        return await self.inner.void(reference, idempotency_key)

    async def refund(self, reference: str, idempotency_key: str) -> RefundResult:
        """The real Refund."""
        return await self.inner.refund(reference, idempotency_key)

    async def get_payment(self, reference: str) -> PaymentInfo | None:
        """The real GetPayment."""
        return await self.inner.get_payment(reference)
