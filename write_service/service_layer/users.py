"""Handlers of the users' commands (aggregate "user")."""

from __future__ import annotations

from write_service.commands.base import Command
from write_service.commands.users import DeactivateUser, RegisterUser, UpdateUserProfile
from write_service.domain import users
from write_service.service_layer.command_steps import (
    AggregateStore,
    CommandMeta,
    CommandResult,
    Dependencies,
    Handler,
    change_aggregate,
    create_aggregate,
)
from write_service.service_layer.ports import UnitOfWork


async def register_user(command: RegisterUser, uow: UnitOfWork, deps: Dependencies, meta: CommandMeta) -> CommandResult:
    """Create a user whose email and username are free."""
    # Hash before the transaction: argon2 is slow on purpose and must not hold a connection.
    password_hash = await deps.hasher.hash(command.password)

    async def create() -> users.User:
        taken = await uow.users.taken_fields(command.email, command.username)
        if "email" in taken:
            raise users.email_taken()
        if "username" in taken:
            raise users.username_taken()
        user = users.User.register(
            user_id=deps.new_id(),
            email=command.email,
            username=command.username,
            password_hash=password_hash,
            full_name=command.full_name,
            now=deps.clock(),
        )
        await uow.users.add(user)
        return user

    return await create_aggregate(command, uow, deps, meta, create=create)


async def update_user_profile(
    command: UpdateUserProfile, uow: UnitOfWork, deps: Dependencies, meta: CommandMeta
) -> CommandResult:
    """Replace the profile of an active user."""

    async def change(user: users.User) -> None:
        user.update_profile(
            full_name=command.full_name, bio=command.bio, avatar_url=command.avatar_url, now=deps.clock()
        )

    return await change_aggregate(command, uow, deps, meta, store=_users, change=change)


async def deactivate_user(
    command: DeactivateUser, uow: UnitOfWork, deps: Dependencies, meta: CommandMeta
) -> CommandResult:
    """Deactivate an active user."""

    async def change(user: users.User) -> None:
        user.deactivate(reason=command.reason, now=deps.clock())

    return await change_aggregate(command, uow, deps, meta, store=_users, change=change)


def _users(uow: UnitOfWork) -> AggregateStore[users.User]:
    return uow.users


USER_HANDLERS: dict[type[Command], Handler] = {
    RegisterUser: register_user,
    UpdateUserProfile: update_user_profile,
    DeactivateUser: deactivate_user,
}
