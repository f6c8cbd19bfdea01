"""In-memory implementations of the ports, for unit tests and contract tests.

They keep the promises the Postgres adapters keep: case-insensitive uniqueness, version
guards, all-or-nothing commits, and idempotency-key locks held until the unit of work
ends. Writes are staged and applied only on `commit()`.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from shared_kernel.contracts import errors
from shared_kernel.contracts.event_log import NewEvent
from shared_kernel.contracts.identity import email_key
from write_service.domain import catalog, orders, users
from write_service.domain.aggregate import Aggregate
from write_service.service_layer.deadline import Deadline
from write_service.service_layer.ports import (
    CommandLogEntry,
    ExpiredKeyPurger,
    IdempotencyScope,
    IdempotencyStore,
    OrderRepository,
    ProductRepository,
    SagaHandoff,
    StoredReply,
    UnitOfWork,
    UserRepository,
)

A = TypeVar("A", bound=Aggregate)

ScopeKey = tuple[str, str, str]


def _scope_key(scope: IdempotencyScope) -> ScopeKey:
    return (scope.principal, scope.command_type, scope.key)


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """An event as the outbox holds it, with the ids of the request that caused it."""

    event: NewEvent
    correlation_id: str
    causation_id: str


@dataclass
class SagaRecord:
    """A saga_executions row and its saga_steps, as far as the write side's commands touch them."""

    id: uuid.UUID
    order_id: uuid.UUID
    saga_type: str
    status: str
    current_step: str
    version: int
    attempts: int
    last_error: str
    next_attempt_at: datetime
    created_at: datetime
    updated_at: datetime
    # (step, kind, outcome, detail, attempt)
    steps: list[tuple[str, str, str, str, int]] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)


@dataclass
class InMemoryDatabase:
    """The committed state every in-memory unit of work shares."""

    users: dict[uuid.UUID, users.User] = field(default_factory=dict)
    products: dict[uuid.UUID, catalog.Product] = field(default_factory=dict)
    orders: dict[uuid.UUID, orders.Order] = field(default_factory=dict)
    # By order id.
    sagas: dict[uuid.UUID, SagaRecord] = field(default_factory=dict)
    outbox: list[OutboxRecord] = field(default_factory=list)
    command_log: list[CommandLogEntry] = field(default_factory=list)
    idempotency: dict[ScopeKey, StoredReply] = field(default_factory=dict)
    # Lock ids held by open units of work (Postgres: transaction-level advisory locks).
    held_locks: set[int] = field(default_factory=set)
    # Raised (first in, first out) by the next commits: lets a test inject transient failures.
    commit_failures: list[Exception] = field(default_factory=list)
    commits: int = 0


class InMemoryIdempotencyStore(IdempotencyStore):
    """Stored replies in an InMemoryDatabase; locks last until the unit of work ends."""

    def __init__(self, db: InMemoryDatabase) -> None:
        self._db = db
        self.locks: set[int] = set()
        self.staged: dict[ScopeKey, StoredReply] = {}

    async def try_lock(self, scope: IdempotencyScope) -> bool:
        """Take the scope's lock unless another unit of work holds it."""
        lock_id = scope.lock_id
        if lock_id in self.locks:
            return True
        if lock_id in self._db.held_locks:
            return False
        self._db.held_locks.add(lock_id)
        self.locks.add(lock_id)
        return True

    async def get(self, scope: IdempotencyScope) -> StoredReply | None:
        """The committed reply for the scope, or None (like a read-committed look-up)."""
        return self._db.idempotency.get(_scope_key(scope))

    async def put(self, reply: StoredReply) -> None:
        """Stage a reply; a live committed one for the same scope is a Conflict."""
        self.check_replaceable(self._db, reply)
        self.staged[_scope_key(reply.scope)] = reply

    @staticmethod
    def check_replaceable(db: InMemoryDatabase, reply: StoredReply) -> None:
        """Raise Conflict when `db` holds a reply for the scope that has not expired by `reply.created_at`."""
        existing = db.idempotency.get(_scope_key(reply.scope))
        if existing is not None and existing.expires_at > reply.created_at:
            raise errors.Conflict("another request with this idempotency key committed first; retry the request")

    def release(self) -> None:
        """Drop what was staged and give the locks back (the transaction ended)."""
        self._db.held_locks.difference_update(self.locks)
        self.locks.clear()
        self.staged = {}


class InMemoryExpiredKeyPurger(ExpiredKeyPurger):
    """Deletes expired records from an InMemoryDatabase, skipping those whose lock is held."""

    def __init__(self, db: InMemoryDatabase) -> None:
        self._db = db

    async def purge(self, now: datetime, limit: int) -> int:
        """Delete up to `limit` expired, unlocked records, oldest expiry first."""
        expired = [r for r in self._db.idempotency.values() if r.expires_at <= now]
        expired.sort(key=lambda r: r.expires_at)
        del expired[limit:]
        deleted = 0
        for record in expired:
            if record.scope.lock_id in self._db.held_locks:
                continue
            del self._db.idempotency[_scope_key(record.scope)]
            deleted += 1
        return deleted


def _same(a: str, b: str) -> bool:
    return a.lower() == b.lower()


def _same_email(a: str, b: str) -> bool:
    return email_key(a) == email_key(b)


class _Staged(Generic[A]):
    """Aggregates of one kind in a dict of the InMemoryDatabase; changes are staged until commit."""

    def __init__(self, committed: dict[uuid.UUID, A]) -> None:
        self._committed = committed
        self.staged: dict[uuid.UUID, A] = {}

    def _visible(self) -> dict[uuid.UUID, A]:
        return {**self._committed, **self.staged}

    async def get(self, aggregate_id: uuid.UUID) -> A | None:
        """A private copy of the aggregate, as a fresh load from storage would give."""
        found = self._visible().get(aggregate_id)
        return copy.deepcopy(found) if found is not None else None

    def adopt(self, aggregate: A) -> None:
        """Nothing to note: every save here is checked against the version stored."""

    async def save(self, aggregate: A) -> None:
        """Stage a changed aggregate if its stored version has not moved."""
        current = self._visible().get(aggregate.id)
        if current is None or current.version != aggregate.stored_version:
            raise errors.Conflict(f"{aggregate.aggregate_type} {aggregate.id} changed concurrently, retry the request")
        self._stage(aggregate)

    def _stage(self, aggregate: A) -> None:
        aggregate.stored_version = aggregate.version
        stored = copy.deepcopy(aggregate)
        stored.pending_events = []
        self.staged[aggregate.id] = stored


class InMemoryUserRepository(_Staged[users.User], UserRepository):
    """Users in an InMemoryDatabase; changes are staged until the unit of work commits."""

    def __init__(self, db: InMemoryDatabase) -> None:
        super().__init__(db.users)

    async def taken_fields(self, email: str, username: str) -> frozenset[str]:
        """Which of "email" and "username" another user already has, case-insensitively."""
        taken: set[str] = set()
        for user in self._visible().values():
            if _same_email(user.email, email):
                taken.add("email")
            if _same(user.username, username):
                taken.add("username")
        return frozenset(taken)

    async def get_customer(self, user_id: uuid.UUID) -> orders.Customer | None:
        """The user's customer facts, or None."""
        user = self._visible().get(user_id)
        if user is None:
            return None
        return orders.Customer(id=user.id, full_name=user.full_name, email=user.email, active=user.active)

    async def add(self, user: users.User) -> None:
        """Stage a new user; a taken email or username raises AlreadyExists."""
        self.check_unique(user, self._visible())
        self._stage(user)

    @staticmethod
    def check_unique(user: users.User, others: dict[uuid.UUID, users.User]) -> None:
        """Raise AlreadyExists when another user holds `user`'s email or username."""
        for other in others.values():
            if other.id == user.id:
                continue
            if _same_email(other.email, user.email):
                raise users.email_taken()
            if _same(other.username, user.username):
                raise users.username_taken()


class InMemoryProductRepository(_Staged[catalog.Product], ProductRepository):
    """Products in an InMemoryDatabase; changes are staged until the unit of work commits."""

    def __init__(self, db: InMemoryDatabase) -> None:
        super().__init__(db.products)

    async def sku_taken(self, sku: str) -> bool:
        """Whether a product already has `sku`, case-insensitively."""
        return any(_same(product.sku, sku) for product in self._visible().values())

    async def by_ids(self, product_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, catalog.Product]:
        """Private copies of the products with these ids."""
        visible = self._visible()
        return {pid: copy.deepcopy(visible[pid]) for pid in sorted(set(product_ids)) if pid in visible}

    async def by_skus(self, skus: Sequence[str]) -> dict[str, catalog.Product]:
        """Copies of the products with these skus, keyed by lower-case sku."""
        wanted = {sku.lower() for sku in skus}
        return {
            product.sku.lower(): copy.deepcopy(product)
            for product in self._visible().values()
            if product.sku.lower() in wanted
        }

    async def add(self, product: catalog.Product) -> None:
        """Stage a new product; a taken sku raises AlreadyExists."""
        self.check_unique(product, self._visible())
        self._stage(product)

    @staticmethod
    def check_unique(product: catalog.Product, others: dict[uuid.UUID, catalog.Product]) -> None:
        """Raise AlreadyExists when another product holds `product`'s sku."""
        if any(other.id != product.id and _same(other.sku, product.sku) for other in others.values()):
            raise catalog.sku_taken()


class InMemoryOrderRepository(_Staged[orders.Order], OrderRepository):
    """Orders in an InMemoryDatabase; changes are staged until the unit of work commits."""

    def __init__(self, db: InMemoryDatabase) -> None:
        super().__init__(db.orders)

    async def awaiting_payment_of(self, customer_id: uuid.UUID) -> list[orders.Order]:
        """Private copies of the customer's pending and reserved orders, by id."""
        found = [
            copy.deepcopy(order)
            for order in self._visible().values()
            if order.customer_id == customer_id and order.status in orders.AWAITING_PAYMENT
        ]
        return sorted(found, key=lambda order: order.id)

    async def add(self, order: orders.Order) -> None:
        """Stage a new order (its foreign keys are checked at commit)."""
        self._stage(order)


class InMemorySagaHandoff(SagaHandoff):
    """Saga rows in an InMemoryDatabase; staged until the unit of work commits."""

    def __init__(self, db: InMemoryDatabase) -> None:
        self._db = db
        self.staged: dict[uuid.UUID, SagaRecord] = {}

    async def start(self, saga_id: uuid.UUID, order_id: uuid.UUID, now: datetime) -> None:
        """Stage a running place_order saga due now at reserve_stock."""
        if order_id in self._db.sagas or order_id in self.staged:
            raise ValueError("saga_executions.order_id is unique")
        self.staged[order_id] = SagaRecord(
            id=saga_id,
            order_id=order_id,
            saga_type="place_order",
            status="running",
            current_step="reserve_stock",
            version=1,
            attempts=0,
            last_error="",
            next_attempt_at=now,
            created_at=now,
            updated_at=now,
        )

    async def request_compensation(self, order_id: uuid.UUID, reason: str, now: datetime) -> None:
        """Stage the saga turned to compensating, with a cancel_requested step."""
        current = self.staged.get(order_id) or self._db.sagas.get(order_id)
        if current is None:
            raise RuntimeError(f"order {order_id} has no saga")
        saga = copy.deepcopy(current)
        saga.status, saga.current_step, saga.attempts, saga.last_error = "compensating", "compensate", 0, ""
        saga.next_attempt_at = saga.updated_at = now
        saga.version += 1
        saga.steps.append(("cancel_requested", "compensate", "succeeded", reason, 1))
        self.staged[order_id] = saga

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
        """Stage the execution row moved on; Conflict when it is no longer at `version`."""
        saga = self._by_id(saga_id)
        if saga.version != version:
            raise errors.Conflict(f"saga {saga_id} changed concurrently")
        saga.status, saga.current_step, saga.context = status, step, dict(context)
        saga.attempts, saga.last_error = attempts, last_error
        saga.version += 1
        self.staged[saga.order_id] = saga

    async def keep(
        self, saga_id: uuid.UUID, version: int, *, step: str, context: Mapping[str, Any], lease_s: float
    ) -> None:
        """Stage the execution row moved on to `step` in its status; Conflict when it is no longer at `version`."""
        saga = self._by_id(saga_id)
        await self.advance(
            saga_id,
            version,
            status=saga.status,
            step=step,
            context=context,
            attempts=0,
            last_error="",
            delay_s=0.0,
            lease_s=lease_s,
        )

    async def log_step(
        self, saga_id: uuid.UUID, *, step: str, kind: str, outcome: str, detail: str, attempt: int
    ) -> None:
        """Stage one step-log row."""
        saga = self._by_id(saga_id)
        saga.steps.append((step, kind, outcome, detail, attempt))
        self.staged[saga.order_id] = saga

    def _by_id(self, saga_id: uuid.UUID) -> SagaRecord:
        for current in [*self.staged.values(), *self._db.sagas.values()]:
            if current.id == saga_id:
                return current if current.order_id in self.staged else copy.deepcopy(current)
        raise RuntimeError(f"no saga {saga_id}")


class InMemoryUnitOfWork(UnitOfWork):
    """A staged transaction over an InMemoryDatabase."""

    def __init__(self, db: InMemoryDatabase, deadline: Deadline | None = None) -> None:
        self._db = db
        self._deadline = deadline
        self._events: list[OutboxRecord] = []
        self._log: list[CommandLogEntry] = []
        self._users = InMemoryUserRepository(db)
        self._products = InMemoryProductRepository(db)
        self._orders = InMemoryOrderRepository(db)
        self._sagas = InMemorySagaHandoff(db)
        self._idempotency = InMemoryIdempotencyStore(db)
        self._open = False
        self.committed = False

    async def __aenter__(self) -> Self:
        """Start with nothing staged."""
        if self._deadline is not None and self._deadline.expired:
            raise errors.Unavailable("the command ran out of time before it reached the database")
        self._users = InMemoryUserRepository(self._db)
        self.users = self._users
        self._products = InMemoryProductRepository(self._db)
        self.products = self._products
        self._orders = InMemoryOrderRepository(self._db)
        self.orders = self._orders
        self._sagas = InMemorySagaHandoff(self._db)
        self.sagas = self._sagas
        self._idempotency = InMemoryIdempotencyStore(self._db)
        self.idempotency = self._idempotency
        self._events, self._log = [], []
        self._open, self.committed = True, False
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Drop whatever was not committed and release the idempotency locks."""
        self._open = False
        self._events, self._log = [], []
        self._idempotency.release()

    def lock_reads(self) -> None:
        """Nothing to do: one unit of work at a time commits here, each checked against what is stored."""

    async def append_events(self, events: Sequence[NewEvent], *, correlation_id: str, causation_id: str) -> None:
        """Stage outbox records."""
        self._require_open()
        self._events.extend(OutboxRecord(e, correlation_id, causation_id) for e in events)

    async def log_command(self, entry: CommandLogEntry) -> None:
        """Stage the command-log row."""
        self._require_open()
        self._log.append(entry)

    async def commit(self) -> None:
        """Apply everything staged at once, re-checking what the database's constraints check."""
        self._require_open()
        if self._db.commit_failures:
            raise self._db.commit_failures.pop(0)
        staged = self._users.staged
        for user in staged.values():
            others = {k: v for k, v in self._db.users.items() if k not in staged}
            InMemoryUserRepository.check_unique(user, {**others, **staged})
        staged_products = self._products.staged
        for product in staged_products.values():
            others_p = {k: v for k, v in self._db.products.items() if k not in staged_products}
            InMemoryProductRepository.check_unique(product, {**others_p, **staged_products})
        known_users, products = {**self._db.users, **staged}, {**self._db.products, **staged_products}
        for order in self._orders.staged.values():
            # The foreign keys of orders and order_lines.
            if order.customer_id not in known_users or any(line.product_id not in products for line in order.lines):
                raise ValueError("an order must name an existing customer and existing products")
        known = {(r.event.aggregate_type, r.event.aggregate_id, r.event.aggregate_version) for r in self._db.outbox}
        for record in self._events:
            key = (record.event.aggregate_type, record.event.aggregate_id, record.event.aggregate_version)
            if key in known:
                raise errors.Conflict("an event with this aggregate version exists, retry the request")
            known.add(key)
        if any(e.command_id == entry.command_id for e in self._db.command_log for entry in self._log):
            raise ValueError("duplicate command_id in the command log")
        for reply in self._idempotency.staged.values():
            InMemoryIdempotencyStore.check_replaceable(self._db, reply)
        self._db.users.update(staged)
        self._db.products.update(staged_products)
        self._db.orders.update(self._orders.staged)
        self._db.sagas.update(self._sagas.staged)
        self._db.outbox.extend(self._events)
        self._db.command_log.extend(self._log)
        self._db.idempotency.update(self._idempotency.staged)
        self._db.commits += 1
        self._events, self._log = [], []
        self._users.staged, self._products.staged, self._orders.staged, self._sagas.staged = {}, {}, {}, {}
        # Like Postgres, the transaction's locks end with it.
        self._idempotency.release()
        self.committed = True

    def _require_open(self) -> None:
        if not self._open:
            raise RuntimeError("the unit of work is used outside `async with`")
