"""Command handlers: plain functions of (command, unit of work, dependencies, metadata).

The steps every handler shares (stored replies, the commit of state, events, command log
and reply) live in `command_steps`; this module holds the users' handlers and the table of
every handler the bus dispatches to.
"""

from __future__ import annotations

from write_service.domain import model
from write_service.domain.commands import Command, DeactivateUser, RegisterUser, UpdateUserProfile
from write_service.service_layer.catalog_handlers import CATALOG_HANDLERS
from write_service.service_layer.command_steps import (
    AggregateStore,
    CommandMeta,
    CommandResult,
    Dependencies,
    Handler,
    IdempotencyClaim,
    ReplyEncoder,
    change_aggregate,
    commit,
    stored_reply,
    utc_now,
)
from write_service.service_layer.order_handlers import ORDER_HANDLERS
from write_service.service_layer.ports import UnitOfWork

__all__ = [
    "HANDLERS",
    "CommandMeta",
    "CommandResult",
    "Dependencies",
    "Handler",
    "IdempotencyClaim",
    "ReplyEncoder",
    "deactivate_user",
    "register_user",
    "update_user_profile",
    "utc_now",
]


async def register_user(command: RegisterUser, uow: UnitOfWork, deps: Dependencies, meta: CommandMeta) -> CommandResult:
    """Create a user whose email and username are free."""
    # Hash before the transaction: argon2 is slow on purpose and must not hold a connection.
    password_hash = await deps.hasher.hash(command.password)
    async with uow:
        if (stored := await stored_reply(uow, command, deps, meta)) is not None:
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
        return await commit(uow, command, user, deps, meta)


async def update_user_profile(
    command: UpdateUserProfile, uow: UnitOfWork, deps: Dependencies, meta: CommandMeta
) -> CommandResult:
    """Replace the profile of an active user."""

    async def change(user: model.User) -> None:
        user.update_profile(
            full_name=command.full_name, bio=command.bio, avatar_url=command.avatar_url, now=deps.clock()
        )

    return await change_aggregate(command, uow, deps, meta, store=_users, change=change)


async def deactivate_user(
    command: DeactivateUser, uow: UnitOfWork, deps: Dependencies, meta: CommandMeta
) -> CommandResult:
    """Deactivate an active user."""

    async def change(user: model.User) -> None:
        user.deactivate(reason=command.reason, now=deps.clock())

    return await change_aggregate(command, uow, deps, meta, store=_users, change=change)


def _users(uow: UnitOfWork) -> AggregateStore[model.User]:
    return uow.users


HANDLERS: dict[type[Command], Handler] = {
    RegisterUser: register_user,
    UpdateUserProfile: update_user_profile,
    DeactivateUser: deactivate_user,
    **CATALOG_HANDLERS,
    **ORDER_HANDLERS,
}
