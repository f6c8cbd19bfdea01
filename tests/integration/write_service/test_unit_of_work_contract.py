"""One contract, two backends: the in-memory fake must behave like the Postgres adapter."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from shared_kernel import errors
from write_service.adapters.memory import InMemoryDatabase, InMemoryUnitOfWork
from write_service.adapters.postgres import PostgresUnitOfWork
from write_service.domain import model
from write_service.service_layer.deadline import Deadline
from write_service.service_layer.ports import UnitOfWork

pytestmark = pytest.mark.integration

NOW = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)

Factory = Callable[[], UnitOfWork]


@pytest.fixture(params=["memory", "postgres"])
def new_uow(request: pytest.FixtureRequest) -> Factory:
    """A factory of units of work on a fresh, empty store of the parametrized kind."""
    if request.param == "memory":
        db = InMemoryDatabase()
        return lambda: InMemoryUnitOfWork(db, Deadline.after(5))
    # Sync fixture: pytest-asyncio can set up the async db_pool only from outside the loop.
    pool: asyncpg.Pool[Any] = request.getfixturevalue("db_pool")
    return lambda: PostgresUnitOfWork(pool, Deadline.after(5))


def a_user(email: str = "Ada@Example.com", username: str = "Ada") -> model.User:
    return model.User.register(
        user_id=uuid.uuid4(), email=email, username=username, password_hash="$argon2id$x", full_name="Ada", now=NOW
    )


async def stored(new_uow: Factory, user_id: uuid.UUID) -> model.User | None:
    async with new_uow() as uow:
        return await uow.users.get_for_update(user_id)


async def add_committed(new_uow: Factory, user: model.User) -> None:
    async with new_uow() as uow:
        await uow.users.add(user)
        await uow.commit()


async def test_add_then_load(new_uow):
    user = a_user()
    await add_committed(new_uow, user)
    loaded = await stored(new_uow, user.id)
    assert loaded is not None
    assert (loaded.email, loaded.username, loaded.version, loaded.stored_version) == ("Ada@Example.com", "Ada", 1, 1)
    assert loaded.created_at == NOW
    assert loaded.pending_events == []


async def test_unknown_user_is_none(new_uow):
    assert await stored(new_uow, uuid.uuid4()) is None


async def test_leaving_without_commit_discards_everything(new_uow):
    user = a_user()
    async with new_uow() as uow:
        await uow.users.add(user)
        await uow.append_events(user.pending_events, correlation_id="c", causation_id="c")
    assert await stored(new_uow, user.id) is None


async def test_taken_fields_ignore_case(new_uow):
    await add_committed(new_uow, a_user())
    async with new_uow() as uow:
        assert await uow.users.taken_fields("ADA@example.com", "nobody") == {"email"}
        assert await uow.users.taken_fields("nobody@example.com", "aDA") == {"username"}
        assert await uow.users.taken_fields("ada@EXAMPLE.com", "ADA") == {"email", "username"}
        assert await uow.users.taken_fields("nobody@example.com", "nobody") == frozenset()


@pytest.mark.parametrize(
    ("email", "username", "field"), [("ADA@example.com", "other", "email"), ("o@e.com", "ada", "username")]
)
async def test_add_refuses_a_duplicate(new_uow, email, username, field):
    await add_committed(new_uow, a_user())
    with pytest.raises(errors.AlreadyExists) as exc_info:
        await add_committed(new_uow, a_user(email=email, username=username))
    assert exc_info.value.field == field


async def test_save_persists_a_change(new_uow):
    user = a_user()
    await add_committed(new_uow, user)
    async with new_uow() as uow:
        loaded = await uow.users.get_for_update(user.id)
        assert loaded is not None
        loaded.deactivate(reason="bye", now=NOW)
        await uow.users.save(loaded)
        await uow.commit()
    again = await stored(new_uow, user.id)
    assert again is not None
    assert (again.active, again.deactivation_reason, again.version) == (False, "bye", 2)


async def test_save_refuses_a_stale_version(new_uow):
    user = a_user()
    await add_committed(new_uow, user)
    stale = await stored(new_uow, user.id)
    assert stale is not None
    stale.stored_version = 7
    stale.update_profile(full_name="x", bio="", avatar_url="", now=NOW)
    with pytest.raises(errors.Conflict):
        async with new_uow() as uow:
            await uow.users.save(stale)
            await uow.commit()
