"""The ports the handlers depend on; adapters implement them for Postgres and in memory."""

from __future__ import annotations

import abc
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Literal, Self

from pydantic import SecretStr

from shared_kernel.event_log import NewEvent
from write_service.domain.model import User
from write_service.service_layer.deadline import Deadline

Outcome = Literal["succeeded", "rejected", "failed"]


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


class UserRepository(abc.ABC):
    """Loads and stores User aggregates inside the unit of work's transaction."""

    @abc.abstractmethod
    async def taken_fields(self, email: str, username: str) -> frozenset[str]:
        """Which of "email" and "username" another user already has, case-insensitively."""

    @abc.abstractmethod
    async def get_for_update(self, user_id: uuid.UUID) -> User | None:
        """The user, locked until the transaction ends, or None when unknown."""

    @abc.abstractmethod
    async def add(self, user: User) -> None:
        """Store a new user; a taken email or username raises AlreadyExists naming the field."""

    @abc.abstractmethod
    async def save(self, user: User) -> None:
        """Store a changed user; raises Conflict when its stored version moved meanwhile."""


class UnitOfWork(abc.ABC):
    """One transaction: state, outbox and command-log rows commit together or not at all."""

    # Leaving the `async with` block without `commit()` rolls everything back.
    users: UserRepository

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
