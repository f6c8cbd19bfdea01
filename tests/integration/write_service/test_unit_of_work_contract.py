"""One contract, two backends: the in-memory fake must behave like the Postgres adapter."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from shared_kernel.contracts import errors
from tests.integration.write_service.conftest import Factory
from write_service.adapters.memory import InMemoryDatabase, InMemoryExpiredKeyPurger, InMemoryUnitOfWork
from write_service.adapters.unit_of_work import PostgresExpiredKeyPurger, PostgresUnitOfWork
from write_service.domain import users
from write_service.service_layer.deadline import Deadline
from write_service.service_layer.ports import ExpiredKeyPurger, IdempotencyScope, StoredReply

pytestmark = pytest.mark.integration

NOW = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)


def a_user(email: str = "Ada@Example.com", username: str = "Ada") -> users.User:
    return users.User.register(
        user_id=uuid.uuid4(), email=email, username=username, password_hash="$argon2id$x", full_name="Ada", now=NOW
    )


async def stored(new_uow: Factory, user_id: uuid.UUID) -> users.User | None:
    async with new_uow() as uow:
        return await uow.users.get(user_id)


async def add_committed(new_uow: Factory, user: users.User) -> None:
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
        loaded = await uow.users.get(user.id)
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


# --- idempotency store -------------------------------------------------------------------


@pytest.fixture(params=["memory", "postgres"])
def backend(request: pytest.FixtureRequest) -> tuple[Factory, ExpiredKeyPurger]:
    """Units of work and an expired-key purger over one fresh store of the parametrized kind."""
    if request.param == "memory":
        db = InMemoryDatabase()
        return (lambda: InMemoryUnitOfWork(db, Deadline.after(5))), InMemoryExpiredKeyPurger(db)
    pool: asyncpg.Pool[Any] = request.getfixturevalue("db_pool")
    return (lambda: PostgresUnitOfWork(pool, Deadline.after(5))), PostgresExpiredKeyPurger(pool)


def a_reply(key: str = "k-1", created_at: datetime = NOW, ttl: timedelta = timedelta(hours=1)) -> StoredReply:
    return StoredReply(
        scope=IdempotencyScope("svc", "RegisterUser", key),
        fingerprint=bytes(range(32)),
        command_id=uuid.uuid4(),
        aggregate_id=str(uuid.uuid4()),
        aggregate_version=1,
        reply=b"\x0a\x01x\x10\x01",
        created_at=created_at,
        expires_at=created_at + ttl,
    )


async def put_committed(new_uow: Factory, reply: StoredReply) -> None:
    async with new_uow() as uow:
        await uow.idempotency.put(reply)
        await uow.commit()


async def stored_reply(new_uow: Factory, scope: IdempotencyScope) -> StoredReply | None:
    async with new_uow() as uow:
        return await uow.idempotency.get(scope)


async def test_a_key_lock_is_exclusive_until_its_unit_of_work_ends(backend):
    new_uow, _ = backend
    scope = IdempotencyScope("svc", "RegisterUser", "k")
    other_scope = IdempotencyScope("svc", "RegisterUser", "other")
    async with new_uow() as second:
        async with new_uow() as first:
            assert await first.idempotency.try_lock(scope)
            assert await first.idempotency.try_lock(scope)  # re-entrant within one transaction
            assert not await second.idempotency.try_lock(scope)
            assert await second.idempotency.try_lock(other_scope)
        # Rolled back: the lock went with the transaction.
        assert await second.idempotency.try_lock(scope)
        await second.commit()
    async with new_uow() as third:
        assert await third.idempotency.try_lock(scope)


async def test_a_reply_is_stored_and_read_back_whole(backend):
    new_uow, _ = backend
    reply = a_reply()
    assert await stored_reply(new_uow, reply.scope) is None
    await put_committed(new_uow, reply)
    assert await stored_reply(new_uow, reply.scope) == reply
    assert await stored_reply(new_uow, IdempotencyScope("other", "RegisterUser", "k-1")) is None


async def test_an_uncommitted_reply_is_invisible(backend):
    new_uow, _ = backend
    reply = a_reply()
    async with new_uow() as uow:
        await uow.idempotency.put(reply)
        assert await stored_reply(new_uow, reply.scope) is None
    assert await stored_reply(new_uow, reply.scope) is None


async def test_a_live_reply_is_never_replaced(backend):
    new_uow, _ = backend
    reply = a_reply()
    await put_committed(new_uow, reply)
    twin = replace(a_reply(), created_at=NOW + timedelta(minutes=59))
    with pytest.raises(errors.Conflict):
        await put_committed(new_uow, twin)
    assert await stored_reply(new_uow, reply.scope) == reply


async def test_an_expired_reply_is_replaced(backend):
    new_uow, _ = backend
    await put_committed(new_uow, a_reply())
    newer = a_reply(created_at=NOW + timedelta(hours=1))
    await put_committed(new_uow, newer)
    assert await stored_reply(new_uow, newer.scope) == newer


async def test_the_purge_spares_live_and_locked_replies(backend):
    new_uow, purger = backend
    old, held, live = a_reply("old"), a_reply("held"), a_reply("live", ttl=timedelta(days=2))
    for reply in (old, held, live):
        await put_committed(new_uow, reply)
    later = NOW + timedelta(days=1)
    async with new_uow() as running:
        assert await running.idempotency.try_lock(held.scope)
        assert await purger.purge(later, 10) == 1
    assert await stored_reply(new_uow, old.scope) is None
    assert await stored_reply(new_uow, held.scope) == held
    assert await purger.purge(later, 10) == 1
    assert await stored_reply(new_uow, held.scope) is None
    assert await stored_reply(new_uow, live.scope) == live
