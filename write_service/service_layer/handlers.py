"""Command handlers: plain functions of (command, unit of work, dependencies, metadata).

Each handler loads what it needs, lets the aggregate decide, and commits the state, the
events, the command-log row and (for a keyed command) the stored reply in one unit of
work. Handlers never publish anything: the relay moves committed outbox rows on.

A keyed command first takes its key's lock and looks for a stored reply, in the same
transaction, before it loads anything: a retry of a command that succeeded must get the
first reply even though the aggregate has moved on (its expected version would no longer
match, its user would already be deactivated).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from shared_kernel.auth import ANONYMOUS
from shared_kernel.errors import Conflict, NotFound
from write_service.domain import model
from write_service.domain.commands import Command, DeactivateUser, RegisterUser, UpdateUserProfile
from write_service.service_layer.deadline import Deadline
from write_service.service_layer.idempotency import key_reused
from write_service.service_layer.ports import (
    CommandLogEntry,
    IdempotencyScope,
    PasswordHasher,
    StoredReply,
    UnitOfWork,
)


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
class CommandResult:
    """The reply to a successful command: the aggregate and its new version."""

    aggregate_id: uuid.UUID
    version: int
    # For a keyed command: the serialized reply that was stored (or, on a replay, returned).
    reply: bytes = b""
    # Set when this is a stored reply returned to a retry: the command that produced it.
    replay_of: uuid.UUID | None = None


ReplyEncoder = Callable[[CommandResult], bytes]


@dataclass(frozen=True, slots=True)
class IdempotencyClaim:
    """A keyed command's scope and fingerprint, and how its reply is stored."""

    scope: IdempotencyScope
    fingerprint: bytes
    retention: timedelta
    encode_reply: ReplyEncoder


@dataclass(frozen=True, slots=True)
class CommandMeta:
    """Facts about one request: its command id (also the events' causation id), correlation and deadline."""

    command_id: uuid.UUID
    correlation_id: str
    received_at: datetime
    deadline: Deadline
    # Who sent it (shared_kernel.auth.current_principal() of the call).
    principal: str = ANONYMOUS
    # The caller's idempotency key, already validated; the bus turns it into `idempotency`.
    idempotency_key: str | None = None
    idempotency: IdempotencyClaim | None = None


Handler = Callable[[Any, UnitOfWork, Dependencies, CommandMeta], Awaitable[CommandResult]]


async def register_user(command: RegisterUser, uow: UnitOfWork, deps: Dependencies, meta: CommandMeta) -> CommandResult:
    """Create a user whose email and username are free."""
    # Hash before the transaction: argon2 is slow on purpose and must not hold a connection.
    password_hash = await deps.hasher.hash(command.password)
    async with uow:
        if (stored := await _stored_reply(uow, command, deps, meta)) is not None:
            return stored
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

    def change(user: model.User) -> None:
        user.update_profile(
            full_name=command.full_name, bio=command.bio, avatar_url=command.avatar_url, now=deps.clock()
        )

    return await _change_user(command, change, uow, deps, meta)


async def deactivate_user(
    command: DeactivateUser, uow: UnitOfWork, deps: Dependencies, meta: CommandMeta
) -> CommandResult:
    """Deactivate an active user."""

    def change(user: model.User) -> None:
        user.deactivate(reason=command.reason, now=deps.clock())

    return await _change_user(command, change, uow, deps, meta)


async def _change_user(
    command: UpdateUserProfile | DeactivateUser,
    change: Callable[[model.User], None],
    uow: UnitOfWork,
    deps: Dependencies,
    meta: CommandMeta,
) -> CommandResult:
    """Load a user, check the expected version, apply `change`, save and commit (or replay a stored reply)."""
    async with uow:
        if (stored := await _stored_reply(uow, command, deps, meta)) is not None:
            return stored
        user = await _get(uow, command.user_id)
        user.require_version(command.expected_version)
        change(user)
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


async def _stored_reply(
    uow: UnitOfWork, command: Command, deps: Dependencies, meta: CommandMeta
) -> CommandResult | None:
    """For a keyed command: lock the key, then return (and log) its stored reply if it has one."""
    claim = meta.idempotency
    if claim is None:
        return None
    # The lock is taken before the look-up: a first call that commits in between has
    # released the lock only after its commit became visible, and under READ COMMITTED
    # the look-up's fresh snapshot sees its row. The primary key backs this up (put()).
    if not await uow.idempotency.try_lock(claim.scope):
        raise Conflict("a request with this idempotency key is still in progress; retry it later")
    stored = await uow.idempotency.get(claim.scope)
    completed_at = deps.clock()
    if stored is None or stored.expires_at <= completed_at:
        return None
    if stored.fingerprint != claim.fingerprint:
        raise key_reused()
    await uow.log_command(
        CommandLogEntry(
            command_id=meta.command_id,
            command_type=command.command_type,
            aggregate_type=command.aggregate_type,
            aggregate_id=stored.aggregate_id,
            correlation_id=meta.correlation_id,
            received_at=meta.received_at,
            completed_at=completed_at,
            outcome="replayed",
            summary=command.summary(),
            principal=meta.principal,
            idempotency_key=claim.scope.key,
            replay_of=stored.command_id,
        )
    )
    await uow.commit()
    return CommandResult(
        aggregate_id=uuid.UUID(stored.aggregate_id),
        version=stored.aggregate_version,
        reply=stored.reply,
        replay_of=stored.command_id,
    )


async def _commit(
    uow: UnitOfWork, command: Command, user: model.User, deps: Dependencies, meta: CommandMeta
) -> CommandResult:
    """Append the user's new events, the command-log row and any stored reply, then commit."""
    events = list(user.pending_events)
    claim = meta.idempotency
    completed_at = deps.clock()
    await uow.append_events(events, correlation_id=meta.correlation_id, causation_id=str(meta.command_id))
    await uow.log_command(
        CommandLogEntry(
            command_id=meta.command_id,
            command_type=command.command_type,
            aggregate_type=model.USER_AGGREGATE,
            aggregate_id=str(user.id),
            correlation_id=meta.correlation_id,
            received_at=meta.received_at,
            completed_at=completed_at,
            outcome="succeeded",
            event_ids=tuple(e.event_id for e in events),
            summary=command.summary(),
            principal=meta.principal,
            idempotency_key=claim.scope.key if claim is not None else "",
        )
    )
    result = CommandResult(aggregate_id=user.id, version=user.version)
    if claim is not None:
        result = replace(result, reply=claim.encode_reply(result))
        await uow.idempotency.put(
            StoredReply(
                scope=claim.scope,
                fingerprint=claim.fingerprint,
                command_id=meta.command_id,
                aggregate_id=str(user.id),
                aggregate_version=user.version,
                reply=result.reply,
                created_at=completed_at,
                expires_at=completed_at + claim.retention,
            )
        )
    await uow.commit()
    user.pending_events.clear()
    return result
