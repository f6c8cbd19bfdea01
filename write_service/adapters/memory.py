"""In-memory implementations of the ports, for unit tests and contract tests.

They keep the promises the Postgres adapters keep: case-insensitive uniqueness, version
guards, all-or-nothing commits, and idempotency-key locks held until the unit of work
ends. Writes are staged and applied only on `commit()`.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Self

from shared_kernel import errors
from shared_kernel.event_log import NewEvent
from shared_kernel.identity import email_key
from write_service.domain import model
from write_service.service_layer.deadline import Deadline
from write_service.service_layer.ports import (
    CommandLogEntry,
    ExpiredKeyPurger,
    IdempotencyScope,
    IdempotencyStore,
    StoredReply,
    UnitOfWork,
    UserRepository,
)

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
class InMemoryDatabase:
    """The committed state every in-memory unit of work shares."""

    users: dict[uuid.UUID, model.User] = field(default_factory=dict)
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


class InMemoryUserRepository(UserRepository):
    """Users in an InMemoryDatabase; changes are staged until the unit of work commits."""

    def __init__(self, db: InMemoryDatabase) -> None:
        self._db = db
        self.staged: dict[uuid.UUID, model.User] = {}

    def _visible(self) -> dict[uuid.UUID, model.User]:
        return {**self._db.users, **self.staged}

    async def taken_fields(self, email: str, username: str) -> frozenset[str]:
        """Which of "email" and "username" another user already has, case-insensitively."""
        taken: set[str] = set()
        for user in self._visible().values():
            if _same_email(user.email, email):
                taken.add("email")
            if _same(user.username, username):
                taken.add("username")
        return frozenset(taken)

    async def get_for_update(self, user_id: uuid.UUID) -> model.User | None:
        """A private copy of the user, as a fresh load from storage would give."""
        user = self._visible().get(user_id)
        return copy.deepcopy(user) if user is not None else None

    async def add(self, user: model.User) -> None:
        """Stage a new user; a taken email or username raises AlreadyExists."""
        self.check_unique(user, self._visible())
        user.stored_version = user.version
        self.staged[user.id] = self._stored_copy(user)

    async def save(self, user: model.User) -> None:
        """Stage a changed user if its stored version has not moved."""
        current = self._visible().get(user.id)
        if current is None or current.version != user.stored_version:
            raise errors.Conflict(f"user {user.id} changed concurrently, retry the request")
        user.stored_version = user.version
        self.staged[user.id] = self._stored_copy(user)

    @staticmethod
    def check_unique(user: model.User, others: dict[uuid.UUID, model.User]) -> None:
        """Raise AlreadyExists when another user holds `user`'s email or username."""
        for other in others.values():
            if other.id == user.id:
                continue
            if _same_email(other.email, user.email):
                raise model.email_taken()
            if _same(other.username, user.username):
                raise model.username_taken()

    @staticmethod
    def _stored_copy(user: model.User) -> model.User:
        stored = copy.deepcopy(user)
        stored.pending_events = []
        return stored


class InMemoryUnitOfWork(UnitOfWork):
    """A staged transaction over an InMemoryDatabase."""

    def __init__(self, db: InMemoryDatabase, deadline: Deadline | None = None) -> None:
        self._db = db
        self._deadline = deadline
        self._events: list[OutboxRecord] = []
        self._log: list[CommandLogEntry] = []
        self._users = InMemoryUserRepository(db)
        self._idempotency = InMemoryIdempotencyStore(db)
        self._open = False
        self.committed = False

    async def __aenter__(self) -> Self:
        """Start with nothing staged."""
        if self._deadline is not None and self._deadline.expired:
            raise errors.Unavailable("the command ran out of time before it reached the database")
        self._users = InMemoryUserRepository(self._db)
        self.users = self._users
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
        self._db.outbox.extend(self._events)
        self._db.command_log.extend(self._log)
        self._db.idempotency.update(self._idempotency.staged)
        self._db.commits += 1
        self._events, self._log = [], []
        self._users.staged = {}
        # Like Postgres, the transaction's locks end with it.
        self._idempotency.release()
        self.committed = True

    def _require_open(self) -> None:
        if not self._open:
            raise RuntimeError("the unit of work is used outside `async with`")
