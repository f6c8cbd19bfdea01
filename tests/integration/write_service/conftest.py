"""Fixtures for the write service's integration tests: a command bus over the test database, and units of
work on either backend for the contract tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from tests.unit.write_service import helpers
from write_service.adapters.memory import InMemoryDatabase, InMemoryUnitOfWork
from write_service.adapters.unit_of_work import PostgresUnitOfWork
from write_service.service_layer.command_steps import Dependencies
from write_service.service_layer.deadline import Deadline
from write_service.service_layer.messagebus import CommandBus
from write_service.service_layer.ports import UnitOfWork

Factory = Callable[[], UnitOfWork]


@pytest.fixture
def pg_bus(db_pool: asyncpg.Pool[Any]) -> CommandBus:
    """The command bus wired to Postgres, with a cheap argon2 hasher."""
    return CommandBus(
        lambda deadline: PostgresUnitOfWork(db_pool, deadline), Dependencies(hasher=helpers.cheap_hasher())
    )


@pytest.fixture(params=["memory", "postgres"])
def new_uow(request: pytest.FixtureRequest) -> Factory:
    """A factory of units of work on a fresh, empty store of the parametrized kind."""
    if request.param == "memory":
        db = InMemoryDatabase()
        return lambda: InMemoryUnitOfWork(db, Deadline.after(5))
    # Sync fixture: pytest-asyncio can set up the async db_pool only from outside the loop.
    pool: asyncpg.Pool[Any] = request.getfixturevalue("db_pool")
    return lambda: PostgresUnitOfWork(pool, Deadline.after(5))
