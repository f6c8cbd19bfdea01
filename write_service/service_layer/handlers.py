"""Command handlers: plain functions of (command, unit of work, dependencies, metadata).

Each handler loads what it needs, lets the aggregate decide, and commits the state, the
events and the command-log row in one unit of work. Handlers never publish anything: the
relay moves committed outbox rows on.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from shared_kernel.errors import NotFound
from write_service.domain import model
from write_service.domain.commands import Command, DeactivateUser, RegisterUser, UpdateUserProfile
from write_service.service_layer.deadline import Deadline
from write_service.service_layer.ports import CommandLogEntry, PasswordHasher, UnitOfWork


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Dependencies:
    """What handlers need besides the unit of work."""

    hasher: PasswordHasher
    clock: Callable[[], datetime] = utc_now
    new_id: Callable[[], uuid.UUID] = uuid.uuid4


@dataclass(frozen=True, slots=True)
class CommandMeta:
    """Facts about one request: its command id (also the events' causation id), correlation and deadline."""

    command_id: uuid.UUID
    correlation_id: str
    received_at: datetime
    deadline: Deadline


@dataclass(frozen=True, slots=True)
class CommandResult:
    """The reply to a successful command: the aggregate and its new version."""

    aggregate_id: uuid.UUID
    version: int


Handler = Callable[[Any, UnitOfWork, Dependencies, CommandMeta], Awaitable[CommandResult]]


async def register_user(command: RegisterUser, uow: UnitOfWork, deps: Dependencies, meta: CommandMeta) -> CommandResult:
    """Create a user whose email and username are free."""
    # Hash before the transaction: argon2 is slow on purpose and must not hold a connection.
    password_hash = await deps.hasher.hash(command.password)
    async with uow:
        taken = await uow.users.taken_fields(command.email, command.username)
        if "email" in taken:
            raise model.email_taken()
        if "username" in taken:
            raise model.username_taken()
        user = model.User.register(
            user_id=deps.new_id(),
            email=command.email,
            username=command.username,
            password_hash=password_hash,
            full_name=command.full_name,
            now=deps.clock(),
        )
        await uow.users.add(user)
        return await _commit(uow, command, user, deps, meta)


async def update_user_profile(
    command: UpdateUserProfile, uow: UnitOfWork, deps: Dependencies, meta: CommandMeta
) -> CommandResult:
    """Replace the profile of an active user."""
    async with uow:
        user = await _get(uow, command.user_id)
        user.update_profile(
            full_name=command.full_name, bio=command.bio, avatar_url=command.avatar_url, now=deps.clock()
        )
        await uow.users.save(user)
        return await _commit(uow, command, user, deps, meta)


async def deactivate_user(
    command: DeactivateUser, uow: UnitOfWork, deps: Dependencies, meta: CommandMeta
) -> CommandResult:
    """Deactivate an active user."""
    async with uow:
        user = await _get(uow, command.user_id)
        user.deactivate(reason=command.reason, now=deps.clock())
        await uow.users.save(user)
        return await _commit(uow, command, user, deps, meta)


HANDLERS: dict[type[Command], Handler] = {
    RegisterUser: register_user,
    UpdateUserProfile: update_user_profile,
    DeactivateUser: deactivate_user,
}


async def _get(uow: UnitOfWork, user_id: uuid.UUID) -> model.User:
    user = await uow.users.get_for_update(user_id)
    if user is None:
        raise NotFound(f"user {user_id} not found")
    return user


async def _commit(
    uow: UnitOfWork, command: Command, user: model.User, deps: Dependencies, meta: CommandMeta
) -> CommandResult:
    """Append the user's new events and the command-log row, then commit."""
    events = list(user.pending_events)
    await uow.append_events(events, correlation_id=meta.correlation_id, causation_id=str(meta.command_id))
    await uow.log_command(
        CommandLogEntry(
            command_id=meta.command_id,
            command_type=command.command_type,
            aggregate_type=model.USER_AGGREGATE,
            aggregate_id=str(user.id),
            correlation_id=meta.correlation_id,
            received_at=meta.received_at,
            completed_at=deps.clock(),
            outcome="succeeded",
            event_ids=tuple(e.event_id for e in events),
            summary=command.summary(),
        )
    )
    await uow.commit()
    user.pending_events.clear()
    return CommandResult(aggregate_id=user.id, version=user.version)
