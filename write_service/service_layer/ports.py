"""The ports the handlers depend on; adapters implement them for Postgres and in memory."""

from __future__ import annotations

import abc
import hashlib
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Literal, Self

from pydantic import SecretStr

from shared_kernel.contracts.event_log import NewEvent
from write_service.domain.catalog import Product
from write_service.domain.orders import Customer, Order
from write_service.domain.users import User
from write_service.service_layer.deadline import Deadline

# "replayed": a retry answered with the stored reply of an earlier command (idempotency key).
Outcome = Literal["succeeded", "rejected", "failed", "replayed"]


@dataclass(frozen=True, slots=True)
class CommandLogEntry:
    """One row of the command log: what was asked, by which request, and how it ended."""

    command_id: uuid.UUID
    command_type: str
    aggregate_type: str
    aggregate_id: str
    correlation_id: str
    received_at: datetime
    completed_at: datetime
    outcome: Outcome
    status_code: str = "OK"
    error_message: str = ""
    event_ids: tuple[uuid.UUID, ...] = ()
    # Already redacted by the command: never a password or a hash.
    summary: Mapping[str, str | int | bool] = field(default_factory=dict)
    # Who asked (`current_principal()` of the call, shared_kernel.platform.security.authn) and
    # with which key ("" for none).
    principal: str = ""
    idempotency_key: str = ""
    # For outcome "replayed": the command whose stored reply was returned.
    replay_of: uuid.UUID | None = None


@dataclass(frozen=True, slots=True)
class IdempotencyScope:
    """What an idempotency key is unique within: one principal's commands of one type."""

    principal: str
    command_type: str
    key: str
    # The signed 64-bit advisory-lock key of this scope, the same in every process; computed
    # once (a command asks for it several times).
    lock_id: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # JSON keeps the three parts unambiguous whatever characters they hold.
        encoded = json.dumps([self.principal, self.command_type, self.key]).encode()
        object.__setattr__(self, "lock_id", int.from_bytes(hashlib.sha256(encoded).digest()[:8], "big", signed=True))


@dataclass(frozen=True, slots=True)
class StoredReply:
    """The first successful reply to a keyed command, kept until `expires_at`."""

    scope: IdempotencyScope
    # SHA-256 of the request's canonical form; the request itself is never stored.
    fingerprint: bytes
    command_id: uuid.UUID
    aggregate_id: str
    aggregate_version: int
    # The serialized reply, returned byte for byte to a retry.
    reply: bytes
    created_at: datetime
    expires_at: datetime


class UserRepository(abc.ABC):
    """Loads and stores User aggregates inside the unit of work's transaction."""

    @abc.abstractmethod
    async def taken_fields(self, email: str, username: str) -> frozenset[str]:
        """Which of "email" and "username" another user already has, case-insensitively."""

    @abc.abstractmethod
    async def get(self, user_id: uuid.UUID) -> User | None:
        """The user as stored, or None when unknown; `save` is guarded by the version read."""

    @abc.abstractmethod
    async def get_customer(self, user_id: uuid.UUID) -> Customer | None:
        """The user as a customer; the unit of work commits only if an active customer is still active."""

    @abc.abstractmethod
    async def add(self, user: User) -> None:
        """Store a new user; a taken email or username raises AlreadyExists naming the field."""

    @abc.abstractmethod
    def adopt(self, user: User) -> None:
        """Take a user this process holds at its stored version as if this unit of work had read it."""

    @abc.abstractmethod
    async def save(self, user: User) -> None:
        """Store a changed user; raises Conflict when its stored version moved meanwhile."""


class ProductRepository(abc.ABC):
    """Loads and stores Product aggregates inside the unit of work's transaction."""

    @abc.abstractmethod
    async def sku_taken(self, sku: str) -> bool:
        """Whether a product already has `sku`, case-insensitively."""

    @abc.abstractmethod
    async def get(self, product_id: uuid.UUID) -> Product | None:
        """The product as stored, or None when unknown; `save` is guarded by the version read."""

    @abc.abstractmethod
    async def by_ids(self, product_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Product]:
        """The products with these ids (unknown ids are left out); each save is guarded by the version read."""

    @abc.abstractmethod
    async def by_skus(self, skus: Sequence[str]) -> dict[str, Product]:
        """The products with these skus, keyed by lower-case sku.

        The unit of work commits only if those still sold are still sold at the price, name
        and currency read: a product discontinued or repriced in between fails it (Conflict).
        """

    @abc.abstractmethod
    async def add(self, product: Product) -> None:
        """Store a new product; a taken sku raises AlreadyExists naming the field "sku"."""

    @abc.abstractmethod
    def adopt(self, product: Product) -> None:
        """Take a product this process holds at its stored version as if this unit of work had read it."""

    @abc.abstractmethod
    async def save(self, product: Product) -> None:
        """Store a changed product; raises Conflict when its stored version moved meanwhile."""


class OrderRepository(abc.ABC):
    """Loads and stores Order aggregates (the order and its lines) inside the unit of work's transaction."""

    @abc.abstractmethod
    async def get(self, order_id: uuid.UUID) -> Order | None:
        """The order with its lines as stored, or None when unknown; `save` is guarded by the version read."""

    @abc.abstractmethod
    async def awaiting_payment_of(self, customer_id: uuid.UUID) -> list[Order]:
        """The customer's orders not yet paid for (pending or reserved); each save is guarded by the version read."""

    @abc.abstractmethod
    async def add(self, order: Order) -> None:
        """Store a new order and its lines."""

    @abc.abstractmethod
    def adopt(self, order: Order) -> None:
        """Take a order this process holds at its stored version as if this unit of work had read it."""

    @abc.abstractmethod
    async def save(self, order: Order) -> None:
        """Store a changed order and its lines; raises Conflict when its stored version moved meanwhile."""


class SagaHandoff(abc.ABC):
    """The order sagas' execution rows and step log, written in the unit of work's transaction.

    A command starts a saga or asks it to compensate; the saga worker moves it on after
    each step, in the same transaction as the step's state and events.
    """

    @abc.abstractmethod
    async def start(self, saga_id: uuid.UUID, order_id: uuid.UUID, now: datetime) -> None:
        """Create the order's place_order saga, due now at its first step (reserve stock)."""

    @abc.abstractmethod
    async def request_compensation(self, order_id: uuid.UUID, reason: str, now: datetime) -> None:
        """Turn the order's saga, whatever its state, to compensating (release stock, void or refund), due now."""

    @abc.abstractmethod
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
        """Move the execution row on, guarded by the `version` the worker holds (Conflict at commit otherwise).

        `delay_s` makes it due again that much later (None: not due); `lease_s` keeps the
        worker's lease that long (None hands it back).
        """

    @abc.abstractmethod
    async def keep(
        self, saga_id: uuid.UUID, version: int, *, step: str, context: Mapping[str, Any], lease_s: float
    ) -> None:
        """Move the execution row on to `step` in the same status, renewing the worker's lease for `lease_s`.

        Attempts and the last error are cleared; the due time is left as it is (the saga was due
        when claimed, so it is due again should the lease run out). Guarded by `version`, as `advance`.
        """

    @abc.abstractmethod
    async def log_step(
        self, saga_id: uuid.UUID, *, step: str, kind: str, outcome: str, detail: str, attempt: int
    ) -> None:
        """Add one step-log row."""


class IdempotencyStore(abc.ABC):
    """Stored replies of keyed commands, read and written inside the unit of work's transaction."""

    @abc.abstractmethod
    async def try_lock(self, scope: IdempotencyScope) -> bool:
        """Hold the scope's lock until the transaction ends; False (at once) when another holds it."""

    @abc.abstractmethod
    async def get(self, scope: IdempotencyScope) -> StoredReply | None:
        """The committed reply stored for the scope, expired or not, or None."""

    async def lock_and_get(self, scope: IdempotencyScope) -> tuple[bool, StoredReply | None]:
        """`try_lock`, then (when it succeeded) `get`: whether the lock was taken, and the stored reply."""
        if not await self.try_lock(scope):
            return False, None
        return True, await self.get(scope)

    async def lock_and_get_many(self, scopes: Sequence[IdempotencyScope]) -> list[tuple[bool, StoredReply | None]]:
        """`lock_and_get` of each scope (all distinct), in order; an adapter may do them all in one call."""
        return [await self.lock_and_get(scope) for scope in scopes]

    @abc.abstractmethod
    async def put(self, reply: StoredReply) -> None:
        """Store a reply, replacing one that expired by `reply.created_at`; Conflict when a live one exists."""


class ExpiredKeyPurger(abc.ABC):
    """Deletes idempotency records past their expiry, in their own transaction."""

    @abc.abstractmethod
    async def purge(self, now: datetime, limit: int) -> int:
        """Delete up to `limit` records that expired by `now` and whose lock nobody holds; return how many."""


class UnitOfWork(abc.ABC):
    """One transaction: state, outbox, command-log and idempotency rows commit together or not at all."""

    # Reads see committed state; writes are applied at `commit()`, guarded by the versions read.
    # Leaving the `async with` block without `commit()` discards everything.
    users: UserRepository
    products: ProductRepository
    orders: OrderRepository
    sagas: SagaHandoff
    idempotency: IdempotencyStore

    @abc.abstractmethod
    async def __aenter__(self) -> Self:
        """Begin the transaction."""

    @abc.abstractmethod
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Roll back unless committed, and release the connection."""

    @abc.abstractmethod
    def lock_reads(self) -> None:
        """Read rows locked until the commit from now on: a retry after a lost guard cannot lose again."""

    @abc.abstractmethod
    async def append_events(self, events: Sequence[NewEvent], *, correlation_id: str, causation_id: str) -> None:
        """Add events to the outbox in this transaction."""

    @abc.abstractmethod
    async def log_command(self, entry: CommandLogEntry) -> None:
        """Add the command-log row in this transaction."""

    @abc.abstractmethod
    async def commit(self) -> None:
        """Commit everything written in this unit of work."""


# A fresh unit of work per attempt, bounded by the command's deadline.
UnitOfWorkFactory = Callable[[Deadline], UnitOfWork]


class PasswordHasher(abc.ABC):
    """Turns a clear password into a one-way hash, off the event loop."""

    @abc.abstractmethod
    async def hash(self, password: SecretStr) -> str:
        """The encoded hash of `password`."""

    @abc.abstractmethod
    async def derive(self, secret: SecretStr, salt: bytes) -> bytes:
        """A deterministic 32-byte digest of `secret` under `salt`, as slow to guess from as `hash`."""
